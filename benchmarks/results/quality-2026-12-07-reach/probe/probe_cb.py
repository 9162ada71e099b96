"""Analysis-only callback (not part of the package; cmd.txt runs it): every `every` steps up to `until`, layer 1's
boundary pre-activation s on the first validation batch, by input class (space, period, letter): its mean and 10/90%
quantiles, the fraction fired, the fraction that are peak targets, the fraction inside the window |s| < 1/a."""
import json
import torch
from pytorch_lightning import Callback
from hmlstm.boundary_options import entropy_peaks


class Probe(Callback):
    def __init__(self, out: str, every: int = 5, until: int = 200):
        self.out, self.every, self.until = out, every, until
        self.batch = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every or step > self.until:
            return
        if self.batch is None:
            self.batch = next(iter(trainer.datamodule.val_dataloader()))
        net = pl_module.net
        x = self.batch["input"]
        was = net.training
        net.eval()
        slope = float(trainer.callback_metrics.get("train/slope", torch.tensor(1.0)))
        out = net(x, None, slope=slope)
        net.train(was)
        layer = net.rnn.layers[0]
        p = layer.params()
        H = layer.hidden_size
        e = net.embed(x)
        h1, h2, z1 = out.rnn.h[0], out.rnn.h[1], out.rnn.z[0]
        h1p = torch.cat([torch.zeros_like(h1[:, :1]), h1[:, :-1]], 1)
        h2p = torch.cat([torch.zeros_like(h2[:, :1]), h2[:, :-1]], 1)
        z1p = torch.cat([torch.zeros_like(z1[:, :1]), z1[:, :-1]], 1)
        s = h1p @ p.U[4 * H] + z1p * (h2p @ p.V[4 * H]) + e @ p.W[4 * H] + p.b[4 * H]
        peaks = entropy_peaks(out.logits)
        rec = {"step": step, "slope": slope}
        word, phrase = self.batch["boundary/word"], self.batch["boundary/phrase"]
        for name, m in (("space", word & ~phrase), ("period", phrase), ("letter", ~word)):
            sv = s[m]
            rec[name] = {"mean": sv.mean().item(), "q10": sv.quantile(0.1).item(), "q90": sv.quantile(0.9).item(),
                         "fire": z1[m].mean().item(), "target": peaks[m].float().mean().item(),
                         "in_window": (sv.abs() < 1 / slope).float().mean().item()}
        with open(self.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
