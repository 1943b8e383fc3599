"""How evenly the symmetric tile-pair kernels' programs fill a GPU: a model, not a timing.

NT-Xent's row tile I visits the T - I tiles J >= I, shared by the launcher's splits
(sslfast/kernels/dot_lse_pair.py: _auto_splits). Programs start in launch order, each
on the first free slot (SMs x programs resident per SM), and take time proportional to
their tile visits. Prints the modelled makespan over the ideal (total visits / slots)
for the launch order the kernels use (a row tile's splits one after another: heaviest
first) and for the transposed order (every row tile's first split, then the second...).

    python tools/grid_balance.py [--sms 132]
"""

import argparse
import heapq

import triton

from sslfast.kernels.dot_lse_pair import _auto_splits


def visits(tiles, row_tile, split, splits):
    """Tile visits of one program: the diagonal tile (split 0) and J = I+1+split, step splits."""
    return len(range(row_tile + 1 + split, tiles, splits)) + (split == 0)


def makespan(jobs, slots):
    free = [0] * slots
    for work in jobs:
        heapq.heappush(free, heapq.heappop(free) + work)
    return max(free)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132, help="SM count (H100 SXM: 132)")
    args = ap.parse_args()
    print(f"{'2N':>7} {'BLOCK':>5} {'resident':>8} {'splits':>6} {'used order':>10} "
          f"{'transposed':>10}")
    for rows in (4096, 16384, 65536, 262144):
        for block in (64, 128):
            tiles = triton.cdiv(rows, block)
            splits = _auto_splits(tiles, tiles, args.sms, symmetric=True)
            for resident in (1, 2):
                slots = resident * args.sms
                used = [visits(tiles, i, s, splits) for i in range(tiles) for s in range(splits)]
                transposed = [visits(tiles, i, s, splits)
                              for s in range(splits) for i in range(tiles)]
                ideal = sum(used) / slots
                print(f"{rows:>7} {block:>5} {resident:>8} {splits:>6} "
                      f"{makespan(used, slots) / ideal:>10.3f} "
                      f"{makespan(transposed, slots) / ideal:>10.3f}")


if __name__ == "__main__":
    main()
