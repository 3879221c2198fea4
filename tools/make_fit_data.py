"""Write synthetic, hidden-state-shaped paired activations for ``prism-deploy fit``.

``X`` rows look like a language model's hidden states in the ways that matter to least
squares: a non-zero mean, a power-law spectrum in a random basis (so the input column blocks
are strongly correlated) and a few "massive activation" coordinates. ``Z = X M^T + noise``
with a dense random ``M``. Written chunk by chunk into ``.npy`` files (float32).

    python tools/make_fit_data.py --rows 20000 --in-dim 4096 --out-dim 4096 -o /tmp/fitdata
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--in-dim", type=int, default=4096)
    ap.add_argument("--out-dim", type=int, default=4096)
    ap.add_argument("--alpha", type=float, default=0.7, help="power-law exponent of X's spectrum")
    ap.add_argument("--noise", type=float, default=0.05, help="noise std relative to the signal's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", required=True, help="folder for x.npy and z.npy")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    d, e = args.in_dim, args.out_dim
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    spectrum = (1.0 + torch.arange(d, dtype=torch.float32)) ** -args.alpha
    mix = spectrum[:, None] * basis.T  # rows of X = g @ mix, g standard normal
    mean = 0.3 * torch.randn(d, generator=gen) * spectrum[0]
    massive = torch.randperm(d, generator=gen)[:4]
    m = torch.randn(e, d, generator=gen) / d**0.5

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_file = np.lib.format.open_memmap(out / "x.npy", mode="w+", dtype=np.float32, shape=(args.rows, d))
    z_file = np.lib.format.open_memmap(out / "z.npy", mode="w+", dtype=np.float32, shape=(args.rows, e))
    signal_std = None
    for a in range(0, args.rows, 2048):
        b = min(a + 2048, args.rows)
        x = torch.randn(b - a, d, generator=gen) @ mix + mean
        x[:, massive] *= 20.0
        y = x @ m.T
        if signal_std is None:
            signal_std = float(y.std())
        z = y + args.noise * signal_std * torch.randn(b - a, e, generator=gen)
        x_file[a:b] = x.numpy()
        z_file[a:b] = z.numpy()
    x_file.flush()
    z_file.flush()
    print(f"wrote {out / 'x.npy'} [{args.rows}, {d}] and {out / 'z.npy'} [{args.rows}, {e}]")


if __name__ == "__main__":
    main()
