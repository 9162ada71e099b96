"""The benchmark harness runs end to end (tiny sizes: no timing is asserted) and forces boundary rates."""

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from patterns import force_boundaries, work_fractions  # noqa: E402

from hmlstm import HMLSTM  # noqa: E402
import hmlstm.backends  # noqa: E402
from fake_data import fake_ptb  # noqa: E402


def test_forced_rate_drives_every_boundary_layer():
    torch.manual_seed(0)
    model = HMLSTM(12, (16, 16, 16), backend="reference")
    x = force_boundaries(model, torch.randn(8, 100, 12), rate=0.2)
    with torch.no_grad():
        out = model(x)
    fire = (x[..., 0] > 0).float()
    assert torch.equal(out.z[0], fire)  # layer 1 follows the pattern exactly
    assert torch.equal(out.z[1], out.z[1] * fire)  # layer 2 fires only where the pattern fires
    assert 0.1 < out.z[1].mean().item() <= fire.mean().item()
    w = work_fractions(model, out)
    assert w["running"][0] == 1.0 and w["running"][2] < w["running"][1] < 1.0
    assert 0.3 < w["ideal_time_fraction"] < 0.7


def test_run_and_report_end_to_end(tmp_path):
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--suites", "smoke", "--min-time", "0.01",
           "--providers", "hmlstm-reference", "lstm", "hmlstm-not-a-backend", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    assert {"device", "torch", "date", "triton", "git"} <= data["header"].keys()
    if (ROOT / ".git").exists():  # the results say which code they measured
        assert re.fullmatch(r"[0-9a-f]{4,40}(\+changes)?", data["header"]["git"]), data["header"]["git"]
    recs = data["records"]
    ok = [r for r in recs if r["provider"] == "hmlstm-reference"]
    assert len(ok) == 6 and all(r["median_s"] > 0 and r["chars_per_s"] > 0 for r in ok)
    assert all(r["speedup_vs_lstm"] is not None for r in ok)
    assert all(r["work"] for r in ok if r["rate"] is not None)
    lstm = [r for r in recs if r["provider"] == "lstm"]
    assert len(lstm) == 4  # no LSTM run at a forced rate below 100%
    failed = [r for r in recs if r["provider"] == "hmlstm-not-a-backend"]
    assert failed and all(r["error"] and r["median_s"] is None for r in failed)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], check=True,
                   capture_output=True, timeout=120)
    md = (tmp_path / "smoke.md").read_text()
    assert "hmlstm-reference" in md and "failed" in md
    png = (tmp_path / "smoke-copy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_interleaved_rounds_report_the_median_round(tmp_path):
    out = tmp_path / "rounds.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--suites", "smoke", "--min-time", "0.03",
           "--rounds", "3", "--modes", "fw", "--providers", "hmlstm-reference", "lstm", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 5  # 3 sizes for hmlstm-reference, 2 for lstm (none at a forced rate below 100%)
    for r in recs:
        rounds = r["extra"]["round_medians_s"]
        assert len(rounds) == 3 and all(t > 0 for t in rounds)
        assert r["median_s"] == sorted(rounds)[1]
    bad = subprocess.run(cmd[:-2] + ["--rounds", "0", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "--rounds must be at least 1" in bad.stderr


PTB = ROOT.parent / "shared" / "data" / "ptb"


@pytest.mark.skipif(not (PTB / "ptb.char.valid.txt").exists(), reason=f"PTB data not found at {PTB}")
def test_trained_suite_runs_the_checkpoints_model_on_validation_text():
    """The trained suite: the checkpoint's HM-LSTM (its own weights, LN, boundaries) and nn.LSTM of its
    sizes on the same embedded PTB validation text; the HM-LSTM records its work fractions."""
    import run
    from hmlstm.data import PTBDataModule
    from hmlstm.training import HMLSTMLanguageModel

    text = PTBDataModule(data_dir=str(PTB), download=False).load_splits()["val"]
    lm = HMLSTMLanguageModel(hidden_sizes=(16, 12), embed_size=8, output_size=8, layer_norm=True,
                             backend="reference", vocab="".join(sorted(set(text)))).eval()
    run._LOADED["in-memory.ckpt"] = lm  # trained_lm's cache: no checkpoint file needed
    run.PTB_DIR["path"] = str(PTB)
    (size,) = run.suites("cpu", "in-memory.ckpt")["trained"]
    assert (size.H, size.L, size.B, size.T) == (16, 2, 64, 100)
    x = run.trained_input(size)
    assert x.shape == (64, 100, 8)
    fw, model, x_model = run.build("hmlstm-reference", size, torch.float32, torch.device("cpu"))
    assert torch.equal(x_model, x) and model.layer_norm
    assert torch.equal(fw(x), lm.net.rnn(x).h[-1])  # the checkpoint's own network
    recs = [run.measure("trained", p, "fw", size, torch.float32, torch.device("cpu"), 0.01)
            for p in ("hmlstm-reference", "lstm")]
    assert all(r.error is None and r.median_s > 0 for r in recs), [r.error for r in recs]
    work = recs[0].work
    assert len(work["running"]) == 2 and work["running"][0] == 1.0 and 0 <= work["running"][1] <= 1


def test_graph_provider_needs_a_gpu_and_says_so():
    """`<provider>-graph` replays a CUDA graph: on the CPU it records why it did not run, and the sweep goes on."""
    import run

    rec = run.measure("smoke", "hmlstm-reference-graph", "fw", run.Size(2, 3, 8), torch.float32,
                      torch.device("cpu"), 0.01)
    assert rec.median_s is None and "needs --device cuda" in rec.error


def test_where_fired_classes_positions_and_reads_a_trained_run(tmp_path, monkeypatch):
    from where_fired import main as where_main, position_classes, word_end_positions

    text = "ab c.de f."
    word = torch.tensor([ch in " ." for ch in text])
    phrase = torch.tensor([ch == "." for ch in text])
    assert position_classes(word, phrase) == ["inner", "before_word", "word_sep", "before_phrase", "phrase_sep",
                                              "phrase_first", "before_word", "word_sep", "before_phrase",
                                              "phrase_sep"]
    assert word_end_positions(word, phrase) == ["space 1", "period 2", "space 1", "period 2"]
    text = "a b.c d e."
    assert word_end_positions(torch.tensor([ch in " ." for ch in text]), torch.tensor([ch == "." for ch in text])) \
        == ["space 1", "period 2", "space 1", "space 2", "period 3"]
    from hmlstm.cli import main as hmlstm_main

    monkeypatch.chdir(tmp_path)
    hmlstm_main(["fit", "--config", "synthetic.yaml", "--model.hidden_sizes", "[8,8,8]", "--model.output_size", "16",
                 "--model.embed_size", "8", "--data.init_args.train_chars", "3000", "--data.init_args.val_chars",
                 "600", "--data.init_args.test_chars", "600", "--data.init_args.batch_size", "4",
                 "--data.init_args.seq_len", "20", "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "lightning_logs" / "csv" / "version_0"  # the CLI's default logger, under the working directory
    where_main([str(run), "--chars", "500", "--out", str(tmp_path / "w.json")])
    result = json.loads((tmp_path / "w.json").read_text())
    assert len(result["layers"]) == 2 and sum(result["counts"].values()) == 500
    assert all(0.0 <= v <= 1.0 for layer in result["layers"] for v in layer["fired"].values())
    by_position = result["layers"][0]["fired_by_word_position"]
    assert set(by_position) == set(result["word_end_counts"]) and all(0.0 <= v <= 1.0 for v in by_position.values())
    # the positions split the word ends: their counts add up to the two separator classes
    assert sum(result["word_end_counts"].values()) == result["counts"]["phrase_sep"] + result["counts"]["word_sep"]
    # the entropy after each kind of word end: a probability's entropy in bits, and a fraction
    entropy = result["entropy_by_word_position"]
    assert set(entropy) == set(by_position)
    from hmlstm.training import HMLSTMLanguageModel

    vocab = HMLSTMLanguageModel.load_from_checkpoint(run / "checkpoints" / "last.ckpt").net.vocab_size  # logits
    assert all(0.0 < e["bits"] <= math.log2(vocab) and 0.0 <= e["above_mean"] <= 1.0 for e in entropy.values()), \
        (entropy, vocab)


def test_where_fired_at_init_rebuilds_the_weights_a_run_started_from(tmp_path, monkeypatch):
    """--at-init: the run's seed and config draw the weights its training started from. A run whose one step
    moves nothing measurable (lr 1e-30) checkpoints its initial weights; the rebuilt model must equal them."""
    from where_fired import initial_model, main as where_main
    from hmlstm.cli import main as hmlstm_main
    from hmlstm.training import HMLSTMLanguageModel

    monkeypatch.chdir(tmp_path)
    hmlstm_main(["fit", "--config", "synthetic.yaml", "--seed_everything", "7", "--model.hidden_sizes", "[8,8,8]",
                 "--model.output_size", "16", "--model.embed_size", "8", "--model.lr", "1e-30",
                 "--model.boundary_rates", "null",  # the band moves a bias by 0.01 whatever the learning rate
                 "--data.init_args.train_chars", "3000", "--data.init_args.val_chars", "600",
                 "--data.init_args.test_chars", "600", "--data.init_args.batch_size", "4",
                 "--data.init_args.seq_len", "20", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
                 "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "lightning_logs" / "csv" / "version_0"
    trained = HMLSTMLanguageModel.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    rebuilt = dict(initial_model(run, trained).named_parameters())
    for name, p in trained.named_parameters():
        # atol: the one Adam step of 1e-30 moves a weight that starts at exactly 0; any other seed moves all
        assert torch.allclose(rebuilt[name], p, rtol=0, atol=1e-20), name
    where_main([str(run), "--chars", "300", "--at-init", "--out", str(tmp_path / "w.json")])
    assert json.loads((tmp_path / "w.json").read_text())["at_init"] is True



def test_forced_boundaries_reruns_a_trained_model_with_layer_2_replaced(tmp_path, monkeypatch):
    from forced_boundaries import PATTERNS, main as forced_main
    from hmlstm.cli import main as hmlstm_main
    from hmlstm.data import SyntheticDataModule

    monkeypatch.chdir(tmp_path)
    data = ["--data.init_args.train_chars", "3000", "--data.init_args.val_chars", "600", "--data.init_args.test_chars",
            "600", "--data.init_args.batch_size", "4", "--data.init_args.seq_len", "20"]
    hmlstm_main(["fit", "--config", "synthetic.yaml", "--model.hidden_sizes", "[8,8,8]", "--model.output_size", "16",
                 "--model.embed_size", "8", *data, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                 "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "lightning_logs" / "csv" / "version_0"
    forced_main([str(run), "--chars", "400", "--out", str(tmp_path / "f.json")])
    result = json.loads((tmp_path / "f.json").read_text())
    assert set(result["forced"]) == set(PATTERNS) and result["chars"] == 400
    # the forced path (reference loop) with the model's own z is the free forward (C++ backend)
    assert result["forced"]["own"] == pytest.approx(result["free"], abs=1e-4)
    dm = SyntheticDataModule(**yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"])
    dm.setup()
    bounds = dm._corpora["val"].boundaries
    assert result["rate_l2"]["true_phrases"] == pytest.approx(float(bounds["phrase"][:400].float().mean()))
    assert result["rate_l2"]["word_ends"] == pytest.approx(float(bounds["word"][:400].float().mean()))
    assert result["rate_l2"]["never"] == 0.0
    # layer 3 reads layer 2 only at its boundaries: boundaries on every word end and none give different BPC
    assert result["forced"]["word_ends"] != result["forced"]["never"]


def test_train_step_times_each_checkpoints_own_training_step(tmp_path):
    """train_step.py trains each checkpoint's own model (weights, cell, sizes) through Lightning and records
    every timed step of every round, the rounds taking turns; a bad run spec is refused by name."""
    import pytorch_lightning as pl
    import train_step
    from hmlstm.data import PTBDataModule
    from hmlstm.training import HMLSTMLanguageModel

    data = fake_ptb(tmp_path)
    ckpts = {}
    for cell in ("hmlstm", "lstm"):
        dm = PTBDataModule(str(data), download=False, batch_size=4, seq_len=10)
        model = HMLSTMLanguageModel(hidden_sizes=(8, 6), embed_size=4, output_size=8, layer_norm=True, cell=cell)
        trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=dm)
        ckpts[cell] = tmp_path / f"{cell}.ckpt"
        trainer.save_checkpoint(ckpts[cell])
    out = tmp_path / "steps.json"
    threads = torch.get_num_threads()
    try:
        train_step.main([f"HM={ckpts['hmlstm']}", f"HM-cost={ckpts['hmlstm']}", f"LSTM={ckpts['lstm']}",
                         "--set", "HM-cost:boundary_cost=[0.25]", "--data-dir", str(data), "--steps", "2",
                         "--warmup", "1", "--rounds", "2", "--batch-size", "4", "--seq-len", "10", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the script sets the process's thread count (--threads, default 1)
    result = json.loads(out.read_text())
    hm, lstm = result["runs"]["HM"], result["runs"]["LSTM"]
    assert (hm["cell"], lstm["cell"]) == ("hmlstm", "lstm") and hm["trained_steps"] == 1
    assert hm["backend"] == lstm["backend"] == hmlstm.backends.resolve("auto", torch.device("cpu"))
    for r in (hm, lstm):
        assert len(r["step_s"]) == 2 and all(len(ts) == 2 and min(ts) > 0 for ts in r["step_s"])
        assert r["median_s"] == statistics.median(t for ts in r["step_s"] for t in ts)
    assert set(hm["boundary_rates"]) == {"train/boundary_rate_l1"} and not lstm["boundary_rates"]
    # --set reached the model it names, and only that one
    assert result["runs"]["HM-cost"]["overrides"] == {"boundary_cost": [0.25]} and hm["overrides"] == {}
    assert result["runs"]["HM-cost"]["charged"] and not hm["charged"]  # and it trained with the charge
    assert len(result["runs"]["HM-cost"]["step_s"]) == 2
    assert result["header"]["threads"] == 1
    with pytest.raises(SystemExit):
        train_step.main(["HM", "--data-dir", str(data)])
    assert train_step.parse_value("1e-3") == 1e-3 and train_step.parse_value("[0.5,0]") == [0.5, 0]
    assert train_step.parse_value("false") is False and train_step.parse_value("step") == "step"
    with pytest.raises(SystemExit):  # one corpus
        train_step.main([f"HM={ckpts['hmlstm']}", "--data-dir", str(data), "--pydoc"])
    for bad in ("NOPE:boundary_cost=0", "HM:boundary_cost", "HM:boundary_cst=0"):  # no such run, value, key
        with pytest.raises(SystemExit):
            train_step.main([f"HM={ckpts['hmlstm']}", "--set", bad, "--data-dir", str(data)])


def test_seeds_trains_each_seed_once_and_counts_the_targets(tmp_path):
    """benchmarks/seeds.py: one run per seed (two at a time), the table of their last validations, and counts that
    follow from the per-seed values; a second call reuses the finished runs instead of training again."""
    from seeds import main as seeds_main

    tiny = ["--model.hidden_sizes", "[8,8,8]", "--model.output_size", "16", "--model.embed_size", "8",
            "--data.init_args.train_chars", "3000", "--data.init_args.val_chars", "600", "--data.init_args.test_chars",
            "600", "--data.init_args.batch_size", "4", "--data.init_args.seq_len", "20", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2"]
    args = ["--config", "synthetic.yaml", "--seeds", "3", "4", "--parallel", "2", "--dir", str(tmp_path / "runs"),
            "--target", "f1_l1_word=0.0", "--target", "f1_l2_phrase=1.01", "--out", str(tmp_path / "s.json"), "--",
            *tiny]
    result = seeds_main(args)
    assert set(result["runs"]) == {"3", "4"} and result["extra_flags"] == tiny
    s = result["summary"]
    assert s["meets"]["f1_l1_word"] == [3, 4]  # every F1 is >= 0
    assert s["meets"]["f1_l2_phrase"] == [] and s["meets_all"] == []  # no F1 exceeds 1
    band = [int(k) for k, r in result["runs"].items() if all(0.02 <= v <= 0.6 for v in r["rates"].values())]
    assert s["rates_in_band"] == band
    assert json.loads((tmp_path / "s.json").read_text())["summary"] == s
    metrics = next((tmp_path / "runs" / "seed-3").glob("lightning_logs/csv/version_*/metrics.csv"))
    stamp = metrics.stat().st_mtime_ns
    again = seeds_main(args)  # finished runs are read, not trained again
    assert metrics.stat().st_mtime_ns == stamp and again["runs"] == result["runs"]
    with pytest.raises(SystemExit):
        seeds_main(["--config", "synthetic.yaml", "--seeds", "1", "--dir", str(tmp_path), "--target", "f1_l1_word"])


def _write_metrics(path: Path, vals: list[tuple[int, float, float]], walls: list[tuple[int, float]]) -> None:
    """A CSVLogger-like metrics.csv: validation rows (step, BPC, layer-1 F1) and training rows (step,
    wall clock), each row holding only its own keys, as Lightning writes them."""
    import csv

    keys = ["epoch", "step", "train/wall_s", "train/bpc_step", "val/bpc", "val/f1_l1_word", "val/boundary_rate_l1"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for step, wall in walls:
            w.writerow({"epoch": 0, "step": step, "train/wall_s": wall, "train/bpc_step": 2.0})
        for step, bpc, f1 in vals:
            w.writerow({"epoch": 0, "step": step, "val/bpc": bpc, "val/f1_l1_word": f1, "val/boundary_rate_l1": 0.3})


def test_quality_compares_runs_at_equal_steps_and_at_the_first_runs_wall_times(tmp_path):
    """benchmarks/quality.py --compare: the steps every run validated at, with each run's own values there, and at
    each validation of the first run the others' best BPC among the validations they logged by that wall time."""
    from quality import at_equal_steps, at_equal_wall, main as quality_main, read_run

    # A is slower per step than B; B validated at one step A never reached.
    _write_metrics(tmp_path / "a" / "metrics.csv", [(10, 2.0, 0.5), (20, 1.8, 0.6), (30, 1.7, 0.7)],
                   [(10, 100.0), (20, 200.0), (30, 300.0)])
    _write_metrics(tmp_path / "b.csv", [(10, 1.9, 0.4), (20, 1.95, 0.4), (25, 1.6, 0.4), (30, 1.75, 0.4)],
                   [(10, 60.0), (20, 120.0), (25, 150.0), (30, 180.0)])
    runs = {"A": read_run(tmp_path / "a"), "B": read_run(tmp_path / "b.csv")}
    steps = at_equal_steps(runs)
    assert [r["step"] for r in steps] == [10, 20, 30]
    assert [(r["A"]["val_bpc"], r["B"]["val_bpc"]) for r in steps] == [(2.0, 1.9), (1.8, 1.95), (1.7, 1.75)]
    assert steps[1]["A"]["f1"]["f1_l1_word"] == 0.6
    wall = at_equal_wall(runs)
    assert [(r["step"], r["wall_s"], r["A"]) for r in wall] == [(10, 100.0, 2.0), (20, 200.0, 1.8), (30, 300.0, 1.7)]
    # by 100 s B had validated at step 10 only; by 200 s at every step, its best being step 25's (not its last)
    assert wall[0]["B"] == {"best_val_bpc": 1.9, "step": 10}
    assert wall[1]["B"] == wall[2]["B"] == {"best_val_bpc": 1.6, "step": 25}
    reverse = at_equal_wall({"B": runs["B"], "A": runs["A"]})
    assert reverse[0]["A"] is None  # by B's first validation (60 s) A had not validated
    quality_main([f"A={tmp_path / 'a'}", f"B={tmp_path / 'b.csv'}", "--compare", "--out", str(tmp_path / "q.json")])
    doc = json.loads((tmp_path / "q.json").read_text())
    assert doc["equal_steps"] == [{"step": 10, "A": 2.0, "B": 1.9}, {"step": 20, "A": 1.8, "B": 1.95},
                                  {"step": 30, "A": 1.7, "B": 1.75}]
    assert doc["equal_wall"][1]["B"]["step"] == 25
    quality_main([f"A={tmp_path / 'a'}", f"B={tmp_path / 'b.csv'}", "--compare", "steps", "--out",
                  str(tmp_path / "s.json")])
    doc = json.loads((tmp_path / "s.json").read_text())
    assert "equal_steps" in doc and "equal_wall" not in doc
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        read_run(tmp_path / "missing")


def test_quality_stability_reads_single_batches_and_the_100_step_mean_after_the_first_epoch():
    """benchmarks/quality.py `stability`: the largest rise within 100 steps of the single-batch BPC and of the logged
    100-step mean, from epoch 1 on (a larger rise in epoch 0 is not counted), and the gradient norm over the running
    median of the norms before it."""
    from quality import stability, stability_table

    def row(step, epoch, bpc, mean=None, grad=1.0):
        r = {"step": str(step), "epoch": str(epoch), "train/bpc_step": str(bpc), "train/grad_norm": str(grad)}
        if mean is not None:
            r["train/bpc_100"] = str(mean)
        return r

    rows = [row(0, 0, 3.0, 3.0), row(50, 0, 2.0, 2.5), row(100, 0, 2.9, 2.6, grad=2.0),  # epoch 0: rises of 0.9
            row(150, 1, 1.50, 1.60), row(200, 1, 1.70, 1.62), row(250, 1, 1.45, 1.58),
            row(300, 1, 1.60, 1.65, grad=20.0), row(450, 1, 1.90, 1.60)]  # 1.90 is 200 steps after 1.45: not counted
    s = stability(rows)
    assert s["bpc_rise_100_steps"] == pytest.approx(0.20)  # 1.50 -> 1.70
    assert s["bpc_100_rise_100_steps"] == pytest.approx(0.07)  # 1.58 -> 1.65
    assert s["grad_norm_max"] == 20.0
    assert s["grad_norm_over_running_median"] == pytest.approx(20.0)  # the median of 1, 1, 2, 1, 1, 1 is 1
    assert "bpc_100_rise_100_steps" not in stability([{k: v for k, v in r.items() if k != "train/bpc_100"}
                                                      for r in rows])
    table = stability_table({"A": {**s, "val_bpc": 1.5}, "B": {}})
    assert "| A | 0.200 | 0.070 | 20.00x |" in table and "| B | - | - | - |" in table


def test_train_step_times_a_checkpoint_of_the_offline_default_on_its_text(tmp_path):
    import pytorch_lightning as pl
    import train_step
    from hmlstm.data import PydocDataModule
    from hmlstm.training import HMLSTMLanguageModel

    dm = PydocDataModule(batch_size=4, seq_len=10)
    model = HMLSTMLanguageModel(hidden_sizes=(8, 6), embed_size=4, output_size=8)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "p.ckpt")
    out = tmp_path / "steps.json"
    threads = torch.get_num_threads()
    try:
        train_step.main([f"P={tmp_path / 'p.ckpt'}", "--pydoc", "--steps", "2", "--warmup", "1", "--rounds", "1",
                         "--batch-size", "4", "--seq-len", "10", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    run = json.loads(out.read_text())["runs"]["P"]
    assert run["trained_steps"] == 1 and len(run["step_s"]) == 1 and len(run["step_s"][0]) == 2
    assert json.loads(out.read_text())["settings"]["pydoc"] is True


def test_copy_run_logs_copies_each_runs_fit_logs_and_its_test_score_where_scored(tmp_path):
    root = Path(__file__).resolve().parents[1]
    src, out = tmp_path / "runs", tmp_path / "out"
    for name, tested in (("hm", True), ("lstm", False)):
        fit = src / name / "lightning_logs" / "csv" / "version_0"
        fit.mkdir(parents=True)
        for f in ("metrics.csv", "config.yaml", "hparams.yaml"):
            (fit / f).write_text(f"{name} {f}")
        (src / name / "cmd.txt").write_text(f"hmlstm fit # {name}")
        if tested:
            test = src / name / "lightning_logs" / "csv" / "version_1"
            test.mkdir(parents=True)
            (test / "metrics.csv").write_text("test score")
            (src / name / "cmd-test.txt").write_text("hmlstm test")
    subprocess.run(["bash", str(root / "benchmarks" / "copy_run_logs.sh"), str(src), str(out), "hm", "lstm"],
                   check=True, cwd=root)
    assert (out / "hm" / "metrics.csv").read_text() == "hm metrics.csv"
    assert (out / "lstm" / "hparams.yaml").read_text() == "lstm hparams.yaml"
    assert (out / "hm" / "test-metrics.csv").read_text() == "test score"
    assert (out / "hm" / "cmd-test.txt").exists() and not (out / "lstm" / "test-metrics.csv").exists()
    missing = subprocess.run(["bash", str(root / "benchmarks" / "copy_run_logs.sh"), str(src), str(out), "gone"],
                             cwd=root, capture_output=True, text=True)
    assert missing.returncode != 0  # a run that is not there fails the collect script, not an empty folder
