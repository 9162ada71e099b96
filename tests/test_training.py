"""The LightningModule: truncated BPTT, slope annealing (also across a resume), the LR schedule,
a self-contained checkpoint, generation."""

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from hmlstm.cli import main as hmlstm_main
from hmlstm.data import SyntheticDataModule, TextDataModule, Vocabulary
from hmlstm.training import CheckpointError, HMLSTMLanguageModel, SlopeAnnealing, export_weights

TINY = dict(hidden_sizes=(8, 8), embed_size=8, output_size=16, layer_norm=False, backend="reference")

warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when other jobs share the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_data(**kw) -> SyntheticDataModule:
    args = dict(seed=0, train_chars=1200, val_chars=400, test_chars=400, batch_size=3, seq_len=8)
    return SyntheticDataModule(**(args | kw))


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(max_epochs=1, limit_train_batches=4, limit_val_batches=2, logger=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(tmp_path), gradient_clip_val=1.0)
    return pl.Trainer(**(args | kw))


def test_tbptt_state_continues_each_stream_exactly():
    torch.manual_seed(0)
    dm = tiny_data(seq_len=7)
    model = HMLSTMLanguageModel(**TINY, vocab=dm.vocab.chars).double()
    model.slope.fill_(1.7)
    loader = dm.val_dataloader()
    # the module's own step over consecutive batches, state carried between them
    model.on_validation_epoch_start()
    total, count = 0.0, 0
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)
    for k, batch in enumerate(loader):
        with torch.no_grad():
            model.validation_step(batch, k)
        total += float(logged["val/nll"]) * batch["target"].numel()
        count += batch["target"].numel()
    # one long run over the whole streams
    streams = loader.dataset.streams  # (B, S)
    with torch.no_grad():
        out = model.net(streams[:, :-1], slope=model.slope)
        full = F.cross_entropy(out.logits.flatten(0, 1), streams[:, 1:].flatten(), reduction="sum")
    assert count == streams[:, 1:].numel()
    assert total == pytest.approx(float(full), rel=1e-10)
    # the carried state is the long run's final state, detached
    state = model._states["val"]
    assert all(not t.requires_grad for grp in state for t in grp)
    for a, b in zip(state.h, out.rnn.state.h):
        torch.testing.assert_close(a, b)
    # and without the carry the loss would differ (the test can fail)
    model.on_validation_epoch_start()
    assert model._states["val"] is None


def test_state_is_reset_at_epoch_start(tmp_path):
    dm = tiny_data()
    model = HMLSTMLanguageModel(**TINY)
    t = trainer(tmp_path)
    t.fit(model, dm)
    a = t.validate(model, dm, verbose=False)[0]["val/bpc"]
    b = t.validate(model, dm, verbose=False)[0]["val/bpc"]
    assert a == pytest.approx(b, rel=1e-6)
    assert model.hparams.vocab == dm.vocab.chars  # filled from the data module


class RecordSlope(pl.Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.current_epoch] = float(pl_module.slope)


def test_slope_annealing_schedule_and_resume(tmp_path):
    assert SlopeAnnealing().slope_at(0) == 1.0
    assert SlopeAnnealing().slope_at(50) == pytest.approx(3.0)
    assert SlopeAnnealing().slope_at(150) == 5.0  # the paper's PTB schedule saturates at 5
    assert {SlopeAnnealing(rate=0.0).slope_at(e) for e in range(20)} == {1.0}  # step function only
    with pytest.raises(ValueError, match="max_slope"):
        SlopeAnnealing(start=2.0, max_slope=1.0)

    expected = {e: min(1.8, 1.0 + 0.5 * e) for e in range(4)}  # 1, 1.5, 1.8, 1.8
    dm = tiny_data()
    rec = RecordSlope()
    t = trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                callbacks=[SlopeAnnealing(1.0, 0.5, 1.8), rec])
    model = HMLSTMLanguageModel(**TINY)
    t.fit(model, dm)
    assert rec.seen == pytest.approx({0: expected[0], 1: expected[1]})
    ckpt = tmp_path / "two.ckpt"
    t.save_checkpoint(ckpt)

    rec2 = RecordSlope()
    t2 = trainer(tmp_path, max_epochs=4, limit_train_batches=2, limit_val_batches=1,
                 callbacks=[SlopeAnnealing(1.0, 0.5, 1.8), rec2])
    resumed = HMLSTMLanguageModel(**TINY)
    t2.fit(resumed, tiny_data(), ckpt_path=ckpt)
    assert rec2.seen == pytest.approx({2: expected[2], 3: expected[3]})  # continues from epoch 2, not 0
    assert float(resumed.slope) == pytest.approx(1.8)


def test_lr_divided_by_50_on_plateau():
    model = HMLSTMLanguageModel(**TINY, vocab="ab", lr=0.01)
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["monitor"] == "val/nll"
    sched.step(1.0)
    sched.step(1.0)  # no improvement: patience 0 divides at once
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / 50)


def test_lr_milestones_drop_at_fixed_epochs_whatever_validation_says(tmp_path):
    class RecordLR(pl.Callback):
        def __init__(self) -> None:
            self.seen: dict[int, float] = {}

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.seen[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    rec = RecordLR()
    t = trainer(tmp_path, max_epochs=4, limit_train_batches=2, limit_val_batches=1, callbacks=[rec])
    # validation improving or not, the rate drops after epochs 1 and 3 (counted from 1) and nowhere else
    t.fit(HMLSTMLanguageModel(**TINY, lr=0.01, lr_factor=0.5, lr_milestones=[1, 3]), tiny_data())
    assert rec.seen == pytest.approx({0: 0.01, 1: 0.005, 2: 0.005, 3: 0.0025})
    for bad in ([], [0], [3, 1], [2, 2]):
        with pytest.raises(ValueError, match="lr_milestones"):
            HMLSTMLanguageModel(**TINY, lr_milestones=bad)


def test_checkpoint_is_self_contained_and_generates(tmp_path):
    dm = tiny_data()
    model = HMLSTMLanguageModel(**TINY)
    t = trainer(tmp_path, callbacks=[SlopeAnnealing(1.0, 0.0, 1.0)])
    t.fit(model, dm)
    ckpt = tmp_path / "m.ckpt"
    t.save_checkpoint(ckpt)
    loaded = HMLSTMLanguageModel.load_from_checkpoint(ckpt)  # no model arguments repeated
    assert loaded.vocab == dm.vocab and loaded.net.rnn.hidden_sizes == (8, 8)
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b)
    g1, g2 = (torch.Generator().manual_seed(7) for _ in range(2))
    s1 = loaded.generate("ab", 25, temperature=0.8, generator=g1)
    assert len(s1) == 25 and set(s1) <= set(dm.vocab.chars)
    assert loaded.generate("ab", 25, temperature=0.8, generator=g2) == s1
    assert len(loaded.generate("", 5, temperature=0)) == 5
    zs = loaded.boundaries("some text here")
    assert len(zs) == 1 and zs[0].shape == (14,) and set(zs[0].tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="temperature"):
        loaded.generate("a", 3, temperature=-1.0)


def test_validation_logs_boundary_metrics(tmp_path):
    dm = tiny_data()
    model = HMLSTMLanguageModel(**TINY)
    t = trainer(tmp_path)
    t.fit(model, dm)
    assert {"train/chars_per_sec", "train/bpc", "train/slope", "train/flush_l1"} <= set(t.callback_metrics)
    metrics = t.validate(model, dm, verbose=False)[0]
    for key in ("val/bpc", "val/boundary_rate_l1", "val/update_l1", "val/flush_l1", "val/copy_l2",
                "val/f1_l1_word", "val/f1_l1_phrase", "val/recall_l1_phrase"):
        assert key in metrics, key
    assert metrics["val/update_l1"] + metrics["val/flush_l1"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["val/copy_l1"] == 0.0  # the first layer never COPYs
    assert 0.0 <= metrics["val/f1_l1_word"] <= 1.0
    assert math.isclose(metrics["val/bpc"] * math.log(2), metrics["val/nll"], rel_tol=1e-5)


def test_no_vocabulary_is_a_clear_error():
    model = HMLSTMLanguageModel(**TINY)
    with pytest.raises(RuntimeError, match="no vocabulary"):
        model.generate("a", 3)
    with pytest.raises(ValueError, match="lr_factor"):
        HMLSTMLanguageModel(**TINY, lr_factor=50.0)


def test_text_module_trains(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    dm = TextDataModule(path=str(path), batch_size=2, seq_len=8)
    model = HMLSTMLanguageModel(**TINY)
    trainer(tmp_path, limit_train_batches=2).fit(model, dm)
    assert Vocabulary(model.hparams.vocab) == dm.vocab


def test_checkpoint_written_by_the_cli_keeps_a_vocabulary_with_a_hash(tmp_path):
    """LightningCLI stores an `_instantiator` in the hyperparameters; Lightning then rebuilds the module through
    jsonargparse, which read PTB's vocabulary ("\\n #$&...") as YAML with a comment and lost it."""
    vocab = "\n #$&'ab"
    model = HMLSTMLanguageModel(**TINY, vocab=vocab)
    ckpt = {"state_dict": model.state_dict(), "pytorch-lightning_version": pl.__version__,
            "hyper_parameters": dict(model.hparams) | {"_instantiator": "pytorch_lightning.cli.instantiate_module"}}
    path = tmp_path / "cli.ckpt"
    torch.save(ckpt, path)
    loaded = HMLSTMLanguageModel.load_from_checkpoint(path)
    assert loaded.vocab.chars == vocab
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_gradient_norm_before_clipping_is_logged(tmp_path):
    """`train/grad_norm` is the norm Lightning clips, taken before clipping: with a clip value far below it the
    logged value still equals the unclipped norm, so an exploding gradient shows in the logs."""

    def grad_norm(module) -> float:
        return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.parameters()
                                                          if p.grad is not None])))

    class PreClip(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norm = grad_norm(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # after the step
            self.after = grad_norm(pl_module)

    probe = PreClip()
    t = trainer(tmp_path, gradient_clip_val=1e-4, callbacks=[probe])
    t.fit(HMLSTMLanguageModel(**TINY), tiny_data())
    logged = float(t.callback_metrics["train/grad_norm"])
    assert logged == pytest.approx(probe.norm, rel=1e-5)
    assert logged > 1e-3 and probe.after <= 1e-4 * 1.001  # the optimizer saw clipped gradients, the log did not


def test_training_bpc_over_the_last_100_steps_is_logged(tmp_path, monkeypatch):
    """`train/bpc_100` is the mean of the last BPC_WINDOW steps' training BPC (fewer at the start): with the
    window shrunk to 3, after 5 steps it equals the mean of steps 3-5's `train/bpc_step`, not of all five."""
    import hmlstm.training as training

    monkeypatch.setattr(training, "BPC_WINDOW", 3)

    class Record(pl.Callback):
        def __init__(self):
            self.bpc, self.window = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.bpc.append(float(trainer.callback_metrics["train/bpc_step"]))
            self.window.append(float(trainer.callback_metrics["train/bpc_100"]))

    rec = Record()
    t = trainer(tmp_path, limit_train_batches=5, callbacks=[rec])
    t.fit(HMLSTMLanguageModel(**TINY), tiny_data())
    assert len(rec.bpc) == 5 and len(set(rec.bpc)) == 5
    assert rec.window[0] == pytest.approx(rec.bpc[0], rel=1e-6)
    assert rec.window[1] == pytest.approx(sum(rec.bpc[:2]) / 2, rel=1e-6)
    assert rec.window[4] == pytest.approx(sum(rec.bpc[2:]) / 3, rel=1e-6)
    assert rec.window[4] != pytest.approx(sum(rec.bpc) / 5, rel=1e-6)


def test_export_keeps_the_model_and_drops_the_run_state(tmp_path, capsys):
    """`hmlstm export`: same weights, hyperparameters and samples as the training checkpoint, without the optimizer
    moments, the carried state and the RNG state (so the file is smaller), and a validate run accepts it."""
    dm = tiny_data()
    model = HMLSTMLanguageModel(**TINY)
    t = trainer(tmp_path, callbacks=[SlopeAnnealing(1.5, 0.0, 1.5)])
    t.fit(model, dm)
    full, small = tmp_path / "full.ckpt", tmp_path / "weights.ckpt"
    t.save_checkpoint(full)
    hmlstm_main(["export", "--ckpt_path", str(full), "--out", str(small)])
    assert "wrote" in capsys.readouterr().out
    ck = torch.load(small, weights_only=False)
    assert "optimizer_states" not in ck and "lr_schedulers" not in ck
    assert ck["hmlstm"]["train_state"] is None and ck["hmlstm"]["rng"] is None
    assert small.stat().st_size < full.stat().st_size
    a, b = HMLSTMLanguageModel.load_from_checkpoint(full), HMLSTMLanguageModel.load_from_checkpoint(small)
    assert float(b.slope) == 1.5 and b.vocab == a.vocab and dict(b.hparams) == dict(a.hparams)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
    gens = [m.generate("ab", 20, temperature=0.8, generator=torch.Generator().manual_seed(3)) for m in (a, b)]
    assert gens[0] == gens[1]
    # the weights file loaded into a fresh module by the Trainer (the CLI's path is in tests/test_cli.py)
    via_file = trainer(tmp_path).validate(HMLSTMLanguageModel(**TINY), dm, ckpt_path=str(small), verbose=False)[0]
    direct = trainer(tmp_path).validate(a, dm, verbose=False)[0]
    assert via_file["val/bpc"] == pytest.approx(direct["val/bpc"], rel=1e-6)


def test_export_errors_name_the_argument(tmp_path):
    with pytest.raises(SystemExit, match="--ckpt_path: no such checkpoint file"):
        hmlstm_main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o.ckpt")])
    bad = tmp_path / "notmodel.ckpt"
    torch.save({"something": 1}, bad)
    with pytest.raises(SystemExit, match="no state_dict"):  # main() turns CheckpointError into a one-line exit
        hmlstm_main(["export", "--ckpt_path", str(bad), "--out", str(tmp_path / "o.ckpt")])
    good = tmp_path / "good.ckpt"
    model = HMLSTMLanguageModel(**TINY)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, good)
    newer = tmp_path / "newer.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "hmlstm": {"format": 99, "version": "9.0"}}, newer)
    with pytest.raises(SystemExit, match=r"format 99.*upgrade hmlstm"):
        hmlstm_main(["export", "--ckpt_path", str(newer), "--out", str(tmp_path / "o.ckpt")])
    with pytest.raises(SystemExit) as e:  # argparse's error: exit status 2, the training checkpoint is kept
        hmlstm_main(["export", "--ckpt_path", str(good), "--out", str(good)])
    assert e.value.code == 2 and "state_dict" in torch.load(good, weights_only=False)


def test_an_exported_file_cannot_resume_training(tmp_path):
    dm = tiny_data()
    t = trainer(tmp_path)
    t.fit(HMLSTMLanguageModel(**TINY), dm)
    full, small = tmp_path / "full.ckpt", tmp_path / "weights.ckpt"
    t.save_checkpoint(full)
    export_weights(full, small)
    with pytest.raises(CheckpointError, match="cannot resume training"):
        trainer(tmp_path, max_epochs=2).fit(HMLSTMLanguageModel(**TINY), dm, ckpt_path=str(small))
