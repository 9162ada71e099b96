"""Failure modes : bad input gets a clear error, non-finite losses stop (or skip) with a
message saying where they started, gradients are clipped, runs are deterministic, mixed precision stays
finite with the cell state in fp32."""

import urllib.error
import warnings

import pytest
import pytorch_lightning as pl
import torch

import hmlstm
from cli_run import run_cli
from hmlstm import HMLSTM
from hmlstm.data import StreamBatches, StreamLoader, SyntheticDataModule, Text8DataModule, TextDataModule
from hmlstm.training import (CheckpointError, HMLSTMLanguageModel, NonFiniteLossError, SlopeAnnealing)

TINY = dict(hidden_sizes=(8, 8), embed_size=8, output_size=16, layer_norm=False, backend="reference")

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def tiny_data(**kw) -> SyntheticDataModule:
    args = dict(seed=0, train_chars=1200, val_chars=400, test_chars=400, batch_size=3, seq_len=8)
    return SyntheticDataModule(**(args | kw))


def trainer(tmp_path, **kw) -> pl.Trainer:
    args = dict(max_epochs=1, limit_train_batches=4, limit_val_batches=2, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                gradient_clip_val=1.0)
    return pl.Trainer(**(args | kw))


def hmlstm_cli(args, cwd, capsys, monkeypatch):
    """`hmlstm ARGS` in this process, in `cwd`, as a user runs it (no HMLSTM_TRACEBACK)."""
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("HMLSTM_TRACEBACK", raising=False)
    return run_cli(args, capsys)


# -- bad input: one test per case ----------------------------------------------------------------------


def test_empty_text_file_names_the_minimum_length(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"training split is empty.*batch_size \* \(seq_len \+ 1\) = 18"):
        TextDataModule(path=str(empty), batch_size=2, seq_len=8).setup()


def test_too_short_text_file_is_a_clear_cli_error(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "short.txt"
    corpus.write_text("abc " * 20)  # 80 characters, train split 72 < 4 * (50 + 1)
    proc = hmlstm_cli(["fit", "--data", "hmlstm.data.TextDataModule", "--data.path", str(corpus),
                       "--data.batch_size", "4", "--data.seq_len", "50", "--trainer.logger", "false"], tmp_path,
                      capsys, monkeypatch)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "hmlstm: error" in proc.stderr and "at least batch_size * (seq_len + 1) = 204" in proc.stderr


def test_undecodable_byte_names_its_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world " * 10 + b"\xff" + b" more")
    with pytest.raises(ValueError, match=r"byte ff at byte offset 120 .*byte_level=True"):
        TextDataModule(path=str(bad), batch_size=2, seq_len=4).setup()


def test_unknown_eval_characters_warn_once_with_the_count(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("abc " * 50)
    val.write_text("abq " * 30 + "xy")
    dm = TextDataModule(train_path=str(train), val_path=str(val), batch_size=2, seq_len=5)
    with pytest.warns(UserWarning, match=r"32 of the 122 characters of the val split \(3 distinct: 'qxy'\)"):
        ids = dm.ids("val")
    assert int((ids == 0).sum()) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the encoded split is cached
        dm.ids("val")
        dm.val_dataloader()


def test_missing_dataset_without_network(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    dm = Text8DataModule(data_dir=str(tmp_path / "text8"))
    with pytest.raises(FileNotFoundError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "text8" in msg and str((tmp_path / "text8").resolve()) in msg and "download failed" in msg
    assert "mattmahoney.net" in msg  # where to get it by hand


def _saved_checkpoint(tmp_path):
    model = HMLSTMLanguageModel(**TINY)
    t = trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    t.fit(model, tiny_data())
    path = tmp_path / "good.ckpt"
    t.save_checkpoint(path)
    return path


def test_truncated_checkpoint(tmp_path, capsys, monkeypatch):
    good = _saved_checkpoint(tmp_path)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt \(\d+ bytes\) is truncated"):
        HMLSTMLanguageModel.load_from_checkpoint(cut)
    # resuming a fit from it: the same message, not an error from inside torch.load
    from hmlstm.training import AtomicCheckpointIO

    t = trainer(tmp_path, plugins=[AtomicCheckpointIO()])
    with pytest.raises(CheckpointError, match="truncated"):
        t.fit(HMLSTMLanguageModel(**TINY), tiny_data(), ckpt_path=str(cut))
    proc = hmlstm_cli(["generate", "--ckpt_path", str(cut)], tmp_path, capsys, monkeypatch)
    assert proc.returncode != 0 and "truncated" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_from_an_incompatible_version(tmp_path):
    good = _saved_checkpoint(tmp_path)
    ckpt = torch.load(good, weights_only=False)
    assert ckpt["hmlstm"]["format"] == 1
    ckpt["hmlstm"] |= {"format": 99, "version": "9.0"}
    newer = tmp_path / "newer.ckpt"
    torch.save(ckpt, newer)
    with pytest.raises(CheckpointError, match=r"hmlstm 9\.0 in checkpoint format 99.*upgrade"):
        HMLSTMLanguageModel.load_from_checkpoint(newer)
    ckpt["hmlstm"]["format"] = 1
    ckpt["state_dict"] = {k.replace("net.rnn.", "net.cell."): v for k, v in ckpt["state_dict"].items()}
    renamed = tmp_path / "renamed.ckpt"
    torch.save(ckpt, renamed)
    with pytest.raises(CheckpointError, match="does not fit"):
        HMLSTMLanguageModel.load_from_checkpoint(renamed)


@pytest.mark.parametrize("name", ["seq_len", "batch_size"])
def test_nonpositive_seq_len_or_batch_size(name, tmp_path):
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got 0"):
        TextDataModule(path="x.txt", **{name: 0})
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got -3"):
        tiny_data(**{name: -3})


def test_nonpositive_slope_schedule_is_refused():
    # the same error through `hmlstm fit --slope.start -1`, as the user sees it: tests/test_cli.py, errors
    with pytest.raises(ValueError, match="slope start must be > 0"):
        SlopeAnnealing(start=0.0)


def test_token_ids_outside_the_vocabulary():
    model = HMLSTMLanguageModel(**TINY, vocab="abc")  # 4 ids: unknown + 3
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 4\).*from 0 to 7"):
        model(torch.tensor([[0, 1, 7]]))


def test_batch_must_split_evenly_across_processes():
    data = StreamBatches(torch.arange(1, 101), batch_size=3, seq_len=4)
    with pytest.raises(ValueError, match="batch size 3 must be divisible by the number of processes 2"):
        StreamLoader(data, rank=0, world_size=2)


# -- non-finite values and gradient clipping ------------------------------------------------------------


class PoisonEmbedding(pl.Callback):
    """Sets the embedding of the symbol at stream 0, time 3 of batch `at` to NaN (restored after it)."""

    def __init__(self, at: int):
        self.at, self.saved, self.first_t = at, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx != self.at:
            return
        x = batch["input"]
        sym = int(x[0, 3])
        self.first_t = int((x == sym).any(0).nonzero()[0])  # where the symbol first occurs in any stream
        self.saved = (sym, module.net.embed.weight.data[sym].clone())
        module.net.embed.weight.data[sym] = float("nan")
        self.head = module.net.head.weight.detach().clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            module.net.embed.weight.data[self.saved[0]] = self.saved[1]
            self.head_changed = not torch.equal(self.head, module.net.head.weight)


def test_nan_loss_stops_naming_step_layer_and_time(tmp_path):
    poison = PoisonEmbedding(at=2)
    model = HMLSTMLanguageModel(**TINY)
    with pytest.raises(NonFiniteLossError) as e:
        trainer(tmp_path, callbacks=[poison]).fit(model, tiny_data())
    msg = str(e.value)
    assert "global step 2 (epoch 0, batch 2 of the epoch)" in msg
    assert f"layer 1's h went non-finite first, at time step {poison.first_t} of the batch" in msg
    assert "net.embed.weight" in msg  # the non-finite parameter is named


def test_nan_loss_can_skip_the_batch(tmp_path):
    model = HMLSTMLanguageModel(**TINY, nonfinite="skip")
    poison = PoisonEmbedding(at=1)
    t = trainer(tmp_path, callbacks=[poison])
    with pytest.warns(UserWarning, match="skipped a batch"):
        t.fit(model, tiny_data())
    assert model.skipped_batches == 1
    assert not poison.head_changed  # no update from the skipped batch
    assert t.fit_loop.epoch_loop.batch_progress.current.completed == 4  # and training went on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        HMLSTMLanguageModel(**TINY, nonfinite="ignore")


class ClipRecorder(HMLSTMLanguageModel):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.norms = getattr(self, "norms", [])
        before = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        after = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.norms.append((before, after))


def test_gradients_are_clipped_as_configured(tmp_path):
    model = ClipRecorder(**TINY)
    trainer(tmp_path, gradient_clip_val=1e-3).fit(model, tiny_data())
    assert len(model.norms) == 4
    for before, after in model.norms:
        assert before > 1e-3 and after == pytest.approx(1e-3, rel=1e-3)


# -- determinism ----------------------------------------------------------------------------------------


class Losses(pl.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def test_seeded_cpu_runs_are_identical(tmp_path):
    runs = []
    for _ in range(2):
        pl.seed_everything(7, verbose=False)
        rec = Losses()
        model = HMLSTMLanguageModel(**(TINY | {"boundary": "sample"}))  # sampling uses the RNG too
        trainer(tmp_path, max_epochs=2, limit_train_batches=5, callbacks=[rec], deterministic=True).fit(model,
                                                                                                     tiny_data())
        runs.append((rec.values, model.state_dict()))
    (a, wa), (b, wb) = runs
    assert len(a) == 10 and a == b
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# -- mixed precision ------------------------------------------------------------------------------------


CPU_BACKENDS = ["reference", "cpp"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_mixed_training_on_cpu(backend, tmp_path):
    if backend not in hmlstm.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not built here")
    rec = Losses()
    model = HMLSTMLanguageModel(**(TINY | {"backend": backend}))
    t = trainer(tmp_path, precision="bf16-mixed", callbacks=[rec])
    t.fit(model, tiny_data())
    assert len(rec.values) == 4 and all(torch.isfinite(torch.tensor(rec.values)))
    state = model._states["train"]
    assert all(c.dtype == torch.float32 for c in state.c)  # the cell state is kept in fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_16_mixed_on_cpu_is_lightnings_bf16():
    # torch has no fp16 autocast worth using on CPU; Lightning turns 16-mixed into bf16-mixed there (with a
    # warning). fp16 itself is tested on a GPU below.
    with pytest.warns(UserWarning, match="bf16-mixed"):
        t = pl.Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    assert t.precision == "bf16-mixed"


def _long_run_is_finite(device, backend, dtype):
    torch.manual_seed(0)
    model = HMLSTM(4, (8, 8), backend=backend).to(device)
    x = torch.randn(2, 10_000, 4, device=device)
    with torch.no_grad(), torch.autocast(device.type if isinstance(device, torch.device) else device, dtype=dtype):
        out = model(x, slope=1.0)
    assert all(c.dtype == torch.float32 for c in out.state.c)
    for t in (*out.h, *out.c, *out.z):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_10000_steps_under_bf16_autocast_stay_finite(backend):
    if backend not in hmlstm.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not built here")
    _long_run_is_finite(torch.device("cpu"), backend, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_training_on_gpu(precision, tmp_path):
    for backend in hmlstm.available_backends("cuda"):
        rec = Losses()
        model = HMLSTMLanguageModel(**(TINY | {"backend": backend}))
        trainer(tmp_path, accelerator="gpu", devices=1, precision=precision, callbacks=[rec]).fit(model, tiny_data())
        assert len(rec.values) == 4 and all(torch.isfinite(torch.tensor(rec.values))), backend
        assert all(c.dtype == torch.float32 for c in model._states["train"].c), backend
        dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
        _long_run_is_finite(torch.device("cuda"), backend, dtype)
