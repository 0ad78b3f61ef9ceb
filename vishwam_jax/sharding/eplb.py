"""Expert-parallel load balancing (EPLB): from measured per-expert loads to a placement of physical
expert slots, with extra replicas for the hottest experts.

The policy is DeepSeek's open-source EPLB (github.com/deepseek-ai/EPLB), re-implemented in numpy
with the same signature and the same meaning of its outputs:

    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)

  weight   [layers, experts]              measured load (tokens routed to each logical expert)
  phy2log  [layers, num_replicas]         the logical expert held by each physical slot; slots are
                                          numbered GPU-major (GPU g holds slots g*R/G .. (g+1)*R/G-1)
  log2phy  [layers, experts, max_copies]  the physical slots of each logical expert, -1 padded
  logcnt   [layers, experts]              how many replicas each logical expert has (>= 1)

Hierarchical when the expert groups divide evenly over the nodes (groups packed onto nodes first so
that group-limited routing stays inside a node, then replicas within each node, then replicas onto
that node's GPUs); otherwise the same with one node and one group (the global policy).

Also here: a moving window of measured loads kept on device (`LoadWindow`), the placement file
(`Placement`, JSON), and the CLI that turns saved counts into such a file:

    python -m vishwam_jax.sharding.eplb COUNTS.npz --replicas 16 --gpus 8 --out placement.json

How the placement is served (redundant slots in the expert-parallel dispatch) is in
models/moe.py and sharding/placement.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

PLACEMENT_FORMAT = "vishwam_jax.expert_placement/1"


class PlacementError(ValueError):
    """A placement (file) that is malformed or does not fit the model it is applied to."""


# -- the policy ------------------------------------------------------------------------------------
def balanced_packing(
    weight: Float[np.ndarray, "x n"], num_packs: int
) -> tuple[Int[np.ndarray, "x n"], Int[np.ndarray, "x n"]]:
    """Put the n items of each row into `num_packs` packs of exactly n / num_packs items, keeping
    the heaviest pack light: heaviest item first, each into the lightest pack that still has room.

    Returns (pack of each item, its position inside the pack)."""
    rows, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{num_packs} packs do not divide {n} items")
    per_pack = n // num_packs
    pack = np.empty((rows, n), np.int64)
    rank = np.empty((rows, n), np.int64)
    for r in range(rows):
        load = np.zeros(num_packs, np.float64)
        filled = np.zeros(num_packs, np.int64)
        # Stable on ties (lower index first) so equal loads always give the same placement.
        for item in np.argsort(-weight[r], kind="stable"):
            open_load = np.where(filled < per_pack, load, np.inf)
            p = int(np.argmin(open_load))  # first lightest pack on a tie
            pack[r, item], rank[r, item] = p, filled[p]
            load[p] += weight[r, item]
            filled[p] += 1
    return pack, rank


def replicate_experts(
    weight: Float[np.ndarray, "x n"], num_slots: int
) -> tuple[Int[np.ndarray, "x s"], Int[np.ndarray, "x s"], Int[np.ndarray, "x n"]]:
    """Give the n logical experts of each row `num_slots` >= n physical slots: one each, then every
    extra slot to the expert whose load per replica is currently the largest.

    Returns (expert of each slot, which replica of its expert the slot is, replicas per expert)."""
    rows, n = weight.shape
    if num_slots < n:
        raise ValueError(f"{num_slots} slots cannot hold {n} experts")
    slot2log = np.tile(np.arange(num_slots, dtype=np.int64) % n, (rows, 1))
    replica = np.zeros((rows, num_slots), np.int64)
    count = np.ones((rows, n), np.int64)
    row_ids = np.arange(rows)
    for s in range(n, num_slots):
        hottest = np.argmax(weight / count, axis=-1)
        slot2log[:, s] = hottest
        replica[:, s] = count[row_ids, hottest]
        count[row_ids, hottest] += 1
    return slot2log, replica, count


def _inverse(perm: Int[np.ndarray, "x n"]) -> Int[np.ndarray, "x n"]:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(
    weight: Float[np.ndarray, "l e"], num_slots: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[Int[np.ndarray, "l s"], Int[np.ndarray, "l s"], Int[np.ndarray, "l e"]]:
    layers, experts = weight.shape
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_slots // num_gpus
    experts_per_node = experts // num_nodes

    # 1. Groups onto nodes. Renumber the experts node-major ("mlog": node n owns mlog ids
    #    n*E/N .. (n+1)*E/N-1, in the order its groups were packed), so later steps work per node.
    group_pack, group_rank = balanced_packing(weight.reshape(layers, num_groups, group_size).sum(-1), num_nodes)
    first_mlog = (group_pack * groups_per_node + group_rank) * group_size
    log2mlog = (first_mlog[:, :, None] + np.arange(group_size)).reshape(layers, experts)
    mlog2log = _inverse(log2mlog)

    # 2. Replicas inside each node: every node gets num_slots / num_nodes slots for its experts.
    node_load = np.take_along_axis(weight, mlog2log, axis=-1).reshape(layers * num_nodes, experts_per_node)
    slot2mlog, slot_replica, mlog_count = replicate_experts(node_load, num_slots // num_nodes)

    # 3. Each node's slots onto its GPUs, by the load each replica is expected to carry.
    slot_load = np.take_along_axis(node_load / mlog_count, slot2mlog, axis=-1)
    gpu, rank_on_gpu = balanced_packing(slot_load, gpus_per_node)
    final2slot = _inverse(gpu * slots_per_gpu + rank_on_gpu)  # final (GPU-major) order -> step-2 slot
    final2mlog = np.take_along_axis(slot2mlog, final2slot, axis=-1)
    final2mlog = final2mlog.reshape(layers, num_nodes, -1) + (np.arange(num_nodes) * experts_per_node)[None, :, None]
    phy2log = np.take_along_axis(mlog2log, final2mlog.reshape(layers, -1), axis=-1)
    phy_replica = np.take_along_axis(slot_replica, final2slot, axis=-1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlog_count.reshape(layers, -1), log2mlog, axis=-1)
    return phy2log, phy_replica, logcnt


def rebalance_experts(
    weight: Float[np.ndarray, "l e"], num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[Int[np.ndarray, "l r"], Int[np.ndarray, "l e c"], Int[np.ndarray, "l e"]]:
    """(phy2log, log2phy, logcnt) for the loads `weight` [layers, experts] (see the module docstring).

    num_replicas: physical slots in all (experts + redundant ones), a multiple of num_gpus.
    num_groups: expert groups of group-limited routing (1 if none); num_nodes, num_gpus: the cluster.
    """
    weight = np.asarray(weight, np.float64)
    if weight.ndim != 2:
        raise ValueError(f"weight must be [layers, experts]; got shape {weight.shape}")
    layers, experts = weight.shape
    if not (np.isfinite(weight).all() and (weight >= 0).all()):
        raise ValueError("weight must be finite and non-negative")
    if num_replicas < experts or num_replicas % num_gpus:
        raise ValueError(
            f"num_replicas={num_replicas} must be >= experts={experts} and a multiple of num_gpus={num_gpus}"
        )
    if num_gpus % num_nodes or experts % num_groups:
        raise ValueError(
            f"num_nodes={num_nodes} must divide num_gpus={num_gpus}, num_groups={num_groups} experts={experts}"
        )
    if num_groups % num_nodes == 0:
        phy2log, replica, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, replica, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_copies = num_replicas - experts + 1
    log2phy = np.full((layers, experts, max_copies), -1, np.int64)
    rows = np.repeat(np.arange(layers), num_replicas)
    log2phy[rows, phy2log.reshape(-1), replica.reshape(-1)] = np.tile(np.arange(num_replicas), layers)
    return phy2log, log2phy, logcnt


def device_loads(
    weight: Float[np.ndarray, "l e"], phy2log: Int[np.ndarray, "l r"], num_devices: int
) -> Float[np.ndarray, "l g"]:
    """Tokens each device receives when every expert's tokens are split evenly over its replicas."""
    weight = np.asarray(weight, np.float64)
    counts = np.stack([np.bincount(row, minlength=weight.shape[1]) for row in phy2log])
    per_slot = np.take_along_axis(weight / np.maximum(counts, 1), phy2log, axis=-1)
    return per_slot.reshape(weight.shape[0], num_devices, -1).sum(-1)


# -- the placement file ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Placement:
    """Which logical expert each physical slot of each MoE layer holds (phy2log [L, R]); the rest
    (log2phy, logcnt) follows from it."""

    phy2log: np.ndarray
    num_experts: int

    def __post_init__(self):
        p = np.asarray(self.phy2log)
        if p.ndim != 2 or not np.issubdtype(p.dtype, np.integer):
            raise PlacementError(f"phy2log must be an integer [layers, slots] array; got {p.dtype} {p.shape}")
        if p.size and (p.min() < 0 or p.max() >= self.num_experts):
            raise PlacementError(f"phy2log holds expert ids outside 0..{self.num_experts - 1}")
        missing = [layer for layer, row in enumerate(p) if len(np.unique(row)) != self.num_experts]
        if missing:
            raise PlacementError(f"layers {missing[:4]} leave some of the {self.num_experts} experts without a slot")
        object.__setattr__(self, "phy2log", p.astype(np.int32))

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def logcnt(self) -> Int[np.ndarray, "l e"]:
        return np.stack([np.bincount(row, minlength=self.num_experts) for row in self.phy2log]).astype(np.int32)

    @property
    def log2phy(self) -> Int[np.ndarray, "l e c"]:
        """Each expert's slots in increasing order, padded with its first slot (never -1, so a
        gather with it is always in range)."""
        copies = self.num_slots - self.num_experts + 1
        out = np.zeros((self.num_layers, self.num_experts, copies), np.int32)
        for layer, row in enumerate(self.phy2log):
            for e in range(self.num_experts):
                slots = np.flatnonzero(row == e)
                out[layer, e] = np.concatenate([slots, np.full(copies - len(slots), slots[0])])
        return out

    @classmethod
    def identity(cls, num_layers: int, num_experts: int) -> Placement:
        return cls(np.tile(np.arange(num_experts, dtype=np.int32), (num_layers, 1)), num_experts)

    def to_json(self, **meta) -> str:
        body = {
            "format": PLACEMENT_FORMAT,
            "num_experts": self.num_experts,
            "num_slots": self.num_slots,
            "phy2log": self.phy2log.tolist(),
            **meta,
        }
        return json.dumps(body)

    def save(self, path: str | Path, **meta) -> None:
        Path(path).write_text(self.to_json(**meta) + "\n")

    @classmethod
    def load(cls, source: str | Path | Placement) -> Placement:
        if isinstance(source, Placement):
            return source
        try:
            body = json.loads(Path(source).expanduser().read_text())
        except (OSError, ValueError) as err:
            raise PlacementError(f"{source}: cannot read an expert placement ({err})") from None
        if not isinstance(body, dict) or body.get("format") != PLACEMENT_FORMAT:
            raise PlacementError(f"{source}: not an expert placement file (format {PLACEMENT_FORMAT!r} expected)")
        try:
            phy2log = np.asarray(body["phy2log"])
            placement = cls(phy2log, int(body["num_experts"]))
        except (KeyError, TypeError, ValueError) as err:
            raise PlacementError(f"{source}: {err}") from None
        if placement.num_slots != body.get("num_slots", placement.num_slots):
            raise PlacementError(
                f"{source}: num_slots={body['num_slots']} but phy2log has {placement.num_slots} columns"
            )
        return placement


def placement_from_loads(
    weight: Float[np.ndarray, "l e"], num_replicas: int, num_gpus: int, *, num_groups: int = 1, num_nodes: int = 1
) -> Placement:
    phy2log, _, _ = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return Placement(phy2log, weight.shape[1])


# -- load statistics -------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoadWindow:
    """The last `window` batches of per-layer per-expert token counts, kept on device as a ring
    buffer: recording is one dynamic-update-slice inside jit, with no host transfer per step, and
    old traffic falls out so a placement follows the current workload rather than all history."""

    counts: Int[Array, "w l e"]
    filled: Int[Array, ""]  # batches recorded so far (the next one overwrites row filled % window)

    @classmethod
    def zeros(cls, window: int, num_layers: int, num_experts: int) -> LoadWindow:
        if window < 1:
            raise ValueError(f"window must be at least one batch; got {window}")
        return cls(jnp.zeros((window, num_layers, num_experts), jnp.int32), jnp.zeros((), jnp.int32))

    def record(self, expert_counts: Int[Array, "l e"]) -> LoadWindow:
        """A new window with `expert_counts` (a forward's ForwardOutput.expert_counts) in it."""
        slot = self.filled % self.counts.shape[0]
        counts = jax.lax.dynamic_update_index_in_dim(self.counts, expert_counts.astype(jnp.int32), slot, axis=0)
        return LoadWindow(counts, self.filled + 1)

    def total(self) -> Int[Array, "l e"]:
        """Tokens per layer and expert over the window (the `weight` of rebalance_experts)."""
        return self.counts.sum(axis=0)

    def save(self, path: str | Path) -> None:
        """An .npz that the CLI reads: `counts` [layers, experts] summed over the window."""
        batches = jnp.minimum(self.filled, self.counts.shape[0])
        np.savez(Path(path), counts=np.asarray(self.total()), batches=np.asarray(batches))


record_load = jax.jit(LoadWindow.record, donate_argnums=(0,))


# -- CLI -------------------------------------------------------------------------------------------
def read_counts(path: str | Path) -> Float[np.ndarray, "l e"]:
    """[layers, experts] loads from an .npz (key `counts`, as LoadWindow.save writes), an .npy, or a
    JSON list of lists. Raises PlacementError on anything else."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            counts = np.asarray(json.loads(path.read_text()), np.float64)
        elif path.suffix == ".npz":
            with np.load(path) as data:
                if "counts" not in data:
                    raise PlacementError(f"{path}: no 'counts' array (has {', '.join(data.files) or 'nothing'})")
                counts = np.asarray(data["counts"], np.float64)
        else:
            counts = np.asarray(np.load(path, allow_pickle=False), np.float64)
    except PlacementError:
        raise
    except Exception as err:  # a damaged or foreign file: one line for the user, not a traceback
        raise PlacementError(f"{path}: cannot read expert counts ({type(err).__name__}: {err})") from None
    if counts.ndim == 3:  # a raw [window, layers, experts] stack
        counts = counts.sum(0)
    if counts.ndim != 2 or counts.size == 0:
        raise PlacementError(f"{path}: counts must be [layers, experts]; got shape {counts.shape}")
    if not (np.isfinite(counts).all() and (counts >= 0).all()):
        raise PlacementError(f"{path}: counts must be finite and non-negative")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vishwam_jax.sharding.eplb",
        description="Turn measured per-expert loads into an expert placement file (DeepSeek's EPLB policy).",
    )
    parser.add_argument("counts", help=".npz (key counts, from LoadWindow.save), .npy or .json [layers, experts]")
    parser.add_argument("--replicas", type=int, help="physical slots in all (default: experts + --redundant * gpus)")
    parser.add_argument("--redundant", type=int, default=0, help="extra slots per GPU (when --replicas is not given)")
    parser.add_argument("--gpus", type=int, required=True, help="devices of the expert axis")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--groups", type=int, default=1, help="expert groups (DeepSeek-V3: num_expert_groups)")
    parser.add_argument("--out", required=True, help="placement JSON to write")
    args = parser.parse_args(argv)
    try:
        counts = read_counts(args.counts)
        replicas = args.replicas if args.replicas is not None else counts.shape[1] + args.redundant * args.gpus
        for name, value in (("gpus", args.gpus), ("nodes", args.nodes), ("groups", args.groups)):
            if value < 1:
                raise PlacementError(f"--{name} must be positive; got {value}")
        placement = placement_from_loads(counts, replicas, args.gpus, num_groups=args.groups, num_nodes=args.nodes)
    except (PlacementError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    before = None
    if counts.shape[1] % args.gpus == 0:
        before = device_loads(counts, Placement.identity(*counts.shape).phy2log, args.gpus)
    after = device_loads(counts, placement.phy2log, args.gpus)

    def ratio(loads):
        return float(np.max(loads.max(-1) / np.maximum(loads.mean(-1), 1e-12)))

    placement.save(args.out, gpus=args.gpus, nodes=args.nodes, groups=args.groups)
    summary = (
        f"wrote {args.out}: {counts.shape[0]} layers, {counts.shape[1]} experts in {replicas} slots "
        f"on {args.gpus} devices"
    )
    # The before figure needs one slot per expert split evenly over the devices.
    was = f"{ratio(before):.3f} -> " if before is not None else ""
    summary += f"; worst layer max/mean device load {was}{ratio(after):.3f}"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
