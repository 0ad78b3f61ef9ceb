#!/usr/bin/env python
"""Expert load balance under EPLB (sharding/eplb.py) on 8 simulated CPU devices, Zipf-skewed routing.

    python scripts/benchmark_eplb.py                  # DeepSeek-V3 routing shape: 256 experts, 8 groups, top-8
    python scripts/benchmark_eplb.py --quick          # fewer layers and tokens (a smoke run)

Routing: each token picks k distinct experts (Gumbel top-k) with probabilities ~ 1/rank^s over a
random ranking of the experts, and the experts of one group (a different group per layer) --hot
times more likely: the realistic case where a topic makes one group far hotter. The placement is
computed from calibration batches (what a LoadWindow would hold) and judged on fresh batches of the
same distribution, so the figure includes the error of predicting tomorrow's load from today's.

Reported per setting: tokens on the heaviest device / the mean, worst layer and mean over layers,
where a device's tokens are the (token, expert) rows the expert-parallel dispatch sends it: each
row's physical slot comes from models/moe.py `to_slots` (the dispatch's own routing), its device is
slot // (slots per device). Before: one slot per expert, experts split evenly (device i holds
experts [i*E/8, (i+1)*E/8)). After: EPLB with 1 and 2 redundant slots per device, global policy
(one node) and hierarchical (2 nodes of 4 devices).

Check (--check, default on): the placed dispatch really runs expert-parallel on the 8 devices and
gives the output of the local placement-free dispatch (small widths; exit 1 on a mismatch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vishwam_jax.models import moe  # noqa: E402
from vishwam_jax.sharding import eplb, make_mesh, use_mesh  # noqa: E402


def zipf_routing(
    rng: np.random.Generator,
    tokens: int,
    experts: int,
    groups: int,
    k: int,
    s: float,
    hot: float,
    hot_group: int,
    ranking: np.ndarray,
) -> np.ndarray:
    """[tokens, k] distinct expert ids drawn from a fixed Zipf law with one group boosted."""
    p = 1.0 / (ranking + 1.0) ** s
    size = experts // groups
    p[hot_group * size : (hot_group + 1) * size] *= hot
    logits = np.log(p / p.sum())
    # Gumbel top-k samples k distinct experts with the Plackett-Luce law of p (no replacement).
    keys = logits[None, :] + rng.gumbel(size=(tokens, experts))
    return np.argpartition(-keys, k - 1, axis=1)[:, :k].astype(np.int32)


def device_tokens(experts: np.ndarray, placement: eplb.Placement, layer: int, devices: int) -> np.ndarray:
    """Rows each device receives for one layer's routing [n, k] under `placement` (its row `layer`)."""
    log2phy = jnp.asarray(placement.log2phy[layer])
    logcnt = jnp.asarray(placement.logcnt[layer])
    slots = np.asarray(moe.to_slots(jnp.asarray(experts), log2phy, logcnt))
    per_device = placement.num_slots // devices
    return np.bincount(slots.reshape(-1) // per_device, minlength=devices)


def imbalance(loads: np.ndarray) -> np.ndarray:
    return loads.max(-1) / loads.mean(-1)


def check_dispatch(seed: int) -> float:
    """Max |placed expert-parallel - local placement-free| on a skewed batch (small widths)."""
    e, d, f, k, n = 32, 8, 8, 4, 512
    rng = np.random.default_rng(seed)
    experts = zipf_routing(rng, n, e, 4, k, 1.0, 8.0, 1, rng.permutation(e))
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {
        "gate": jax.random.normal(keys[0], (e, d, f)),
        "up": jax.random.normal(keys[1], (e, d, f)),
        "down": jax.random.normal(keys[2], (e, f, d)),
    }
    x = jax.random.normal(keys[3], (n, d))
    gates = jnp.asarray(rng.uniform(0.1, 1, (n, k)), jnp.float32)
    ref, _ = jax.jit(lambda *a: moe.dispatch_experts(*a, "silu", e))(x, gates, jnp.asarray(experts), params)
    weight = np.bincount(experts.ravel(), minlength=e)[None].astype(float)
    placement = eplb.placement_from_loads(weight, e + 2 * 8, 8)
    slots = {name: w[placement.phy2log[0]] for name, w in params.items()}
    tables = (jnp.asarray(placement.log2phy[0]), jnp.asarray(placement.logcnt[0]))
    with use_mesh(make_mesh(expert=8), "expert"):
        out, _ = jax.jit(lambda *a: moe.dispatch_experts(*a, "silu", e, tables))(x, gates, jnp.asarray(experts), slots)
    return float(jnp.max(jnp.abs(out - ref)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per batch (all devices)")
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--zipf", type=float, default=1.0, help="exponent s of p ~ 1/rank^s")
    parser.add_argument("--hot", type=float, default=8.0, help="boost of the hot group's experts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-check", dest="check", action="store_false")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.tokens, args.calibration_batches, args.eval_batches = 2, 2048, 2, 2
    devices = 8
    if jax.device_count() < devices:
        print(f"needs {devices} devices; have {jax.device_count()}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    e = args.experts
    calib = np.zeros((args.layers, e))
    evals: list[list[np.ndarray]] = []
    for layer in range(args.layers):
        ranking = rng.permutation(e)
        hot_group = layer % args.groups

        def draw(hot_group=hot_group, ranking=ranking):
            return zipf_routing(rng, args.tokens, e, args.groups, args.topk, args.zipf, args.hot, hot_group, ranking)

        for _ in range(args.calibration_batches):
            calib[layer] += np.bincount(draw().ravel(), minlength=e)
        evals.append([draw() for _ in range(args.eval_batches)])

    def measure(placement: eplb.Placement) -> np.ndarray:
        loads = np.array(
            [
                [device_tokens(batch, placement, layer, devices) for batch in evals[layer]]
                for layer in range(args.layers)
            ]
        )  # [layers, batches, devices]
        return imbalance(loads).mean(-1)  # per layer, averaged over the fresh batches

    print(
        f"{args.layers} layers x {e} experts ({args.groups} groups, top-{args.topk}), "
        f"{args.tokens} tokens per batch on {devices} devices; Zipf s={args.zipf}, hot group x{args.hot}; "
        f"placement from {args.calibration_batches} batches, judged on {args.eval_batches} fresh ones"
    )
    hottest_share = (calib.max(-1) / calib.sum(-1) * args.topk).mean()
    print(
        f"hottest expert gets {hottest_share:.1%} of the tokens (mean over layers); "
        f"hot group gets {np.mean(calib.reshape(args.layers, args.groups, -1).sum(-1).max(-1) / calib.sum(-1)):.1%}"
    )
    print(f"{'placement':<46} {'slots':>5}  {'max/mean worst layer':>20}  {'mean over layers':>16}")
    rows = [("one slot per expert (no EPLB)", eplb.Placement.identity(args.layers, e))]
    for redundant in (1, 2):
        slots = e + redundant * devices
        rows.append((f"EPLB global, {redundant} redundant/device", eplb.placement_from_loads(calib, slots, devices)))
        rows.append(
            (
                f"EPLB hierarchical 2 nodes, {redundant} redundant/device",
                eplb.placement_from_loads(calib, slots, devices, num_groups=args.groups, num_nodes=2),
            )
        )
    for label, placement in rows:
        ratio = measure(placement)
        print(f"{label:<46} {placement.num_slots:>5}  {ratio.max():>20.3f}  {ratio.mean():>16.3f}")
    status = 0
    if args.check:
        err = check_dispatch(args.seed)
        ok = err < 1e-4
        print(
            f"check: placed expert-parallel dispatch on 8 devices vs local placement-free dispatch, "
            f"max |diff| {err:.2e} "
            f"({'ok' if ok else 'MISMATCH'})"
        )
        status = 0 if ok else 1
    print(f"({time.perf_counter() - start:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
