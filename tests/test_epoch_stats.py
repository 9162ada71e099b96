"""Epoch values summed on the device and logged once an epoch (hmlstm.epoch_stats): the sums, and that the
values a validation logs are the means over every character of the epoch."""

import warnings

import pytest
import torch

from hmlstm.data import SyntheticDataModule
from hmlstm.epoch_stats import EpochStats
from hmlstm.metrics import operation_fractions
from hmlstm.training import HMLSTMLanguageModel

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def test_weighted_mean_and_maximum_per_stage():
    s = EpochStats()
    for value, weight in ((1.0, 2), (4.0, 1), (0.5, 5)):
        s.add("train", "a", torch.tensor(value), weight)
        s.add("train", "m", torch.tensor(value), reduce="max")
    s.add("val", "a", torch.tensor(9.0), 3)
    train = s.compute("train")
    assert float(train["a"]) == pytest.approx((1.0 * 2 + 4.0 + 0.5 * 5) / 8)
    assert float(train["m"]) == 4.0 and float(s.compute("val")["a"]) == 9.0
    assert train["a"].dim() == 0 and not train["a"].requires_grad
    s.reset("train")
    assert s.compute("train") == {} and set(s.compute("val")) == {"a"}


def test_bad_values_are_refused_by_name():
    s = EpochStats()
    with pytest.raises(ValueError, match="0-d"):
        s.add("train", "rate", torch.ones(3))
    with pytest.raises(ValueError, match="reduce"):
        s.add("train", "rate", torch.ones(()), reduce="sum")
    s.add("train", "rate", torch.ones(()))
    with pytest.raises(ValueError, match="rate was accumulated with reduce='mean'"):
        s.add("train", "rate", torch.ones(()), reduce="max")


def test_validation_logs_the_rates_and_operations_of_the_whole_streams():
    """Batch by batch with the state carried, the logged epoch values equal one long run's over the same
    characters; the last batch is shorter, so an unweighted mean of the batches would differ."""
    torch.manual_seed(0)
    dm = SyntheticDataModule(seed=0, train_chars=1200, val_chars=430, test_chars=400, batch_size=3, seq_len=8)
    model = HMLSTMLanguageModel(hidden_sizes=(8, 8, 8), embed_size=8, output_size=16, layer_norm=False,
                                backend="reference", vocab=dm.vocab.chars).double()
    model.slope.fill_(1.3)
    loader = dm.val_dataloader()
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    model.on_validation_epoch_start()
    sizes = []
    for k, batch in enumerate(loader):
        with torch.no_grad():
            model.validation_step(batch, k)
        sizes.append(batch["target"].shape[1])
    model._log_epoch("val")
    assert len(set(sizes)) > 1, sizes  # a short last batch
    streams = loader.dataset.streams  # (B, S)
    with torch.no_grad():
        out = model.net(streams[:, :-1], slope=model.slope)
    for k, z in enumerate(out.rnn.z, start=1):
        assert 0.05 < float(z.mean()) < 0.95
        assert logged[f"val/boundary_rate_l{k}"] == pytest.approx(float(z.mean()), rel=1e-6)
    zeros = [torch.zeros_like(z[:, 0]) for z in out.rnn.z]
    for k, frac in enumerate(operation_fractions(out.rnn.z, zeros), start=1):
        for op, value in frac.items():
            assert logged[f"val/{op}_l{k}"] == pytest.approx(float(value), rel=1e-6, abs=1e-7), (op, k)
