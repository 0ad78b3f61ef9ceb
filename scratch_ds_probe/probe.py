# Temporary probe (deepseek helper): do stacked, scanned weights cost copies in front of Pallas kernels?
import time, sys
import jax, jax.numpy as jnp, numpy as np
import types
pkg = types.ModuleType('vishwam_jax'); pkg.__path__ = ['vishwam_jax']; sys.modules['vishwam_jax'] = pkg
from vishwam_jax.pallas_kernels import grouped_matmul as gm, mla_attention as ma

def timeit(fn, *a, iters=20):
    r = fn(*a); jax.block_until_ready(r)
    r = fn(*a); jax.block_until_ready(r)
    ts = []
    for _ in range(iters):
        t = time.perf_counter(); jax.block_until_ready(fn(*a)); ts.append(time.perf_counter() - t)
    return np.median(ts) * 1e3

L, E, d, f = 4, 64, 7168, 2048
keys = iter(jax.random.split(jax.random.key(0), 64))
mk = jax.jit(lambda k, s: (jax.random.normal(k, s, jnp.float32) * 0.02).astype(jnp.bfloat16), static_argnums=1)
g = [mk(next(keys), (E, d, f)) for _ in range(L)]
u = [mk(next(keys), (E, d, f)) for _ in range(L)]
dn = [mk(next(keys), (E, f, d)) for _ in range(L)]
rows = 256
x = mk(next(keys), (rows, d))
gs = jnp.asarray(np.bincount(np.random.default_rng(0).integers(0, E, rows), minlength=E), jnp.int32)

def layer(x, gw, uw, dw):
    h = jax.nn.silu(gm.gmm(x, gw, gs, preferred_element_type=x.dtype)) * gm.gmm(x, uw, gs, preferred_element_type=x.dtype)
    return gm.gmm(h, dw, gs, preferred_element_type=x.dtype)

@jax.jit
def loop(x, g, u, dn):
    for l in range(L):
        x = layer(x, g[l], u[l], dn[l])
    return x
print("gmm loop      ms", timeit(loop, x, g, u, dn), flush=True)
if "--skip-gmm" in sys.argv: g = u = dn = None
sg, su, sd = jnp.stack(g), jnp.stack(u), jnp.stack(dn)
del g, u, dn
@jax.jit
def scan(x, sg, su, sd):
    return jax.lax.scan(lambda x, w: (layer(x, *w), None), x, (sg, su, sd))[0]
@jax.jit
def static(x, sg, su, sd):
    for l in range(L):
        x = layer(x, sg[l], su[l], sd[l])
    return x
print("gmm scan      ms", timeit(scan, x, sg, su, sd), flush=True)
print("gmm static    ms", timeit(static, x, sg, su, sd), flush=True)
txt = scan.lower(x, sg, su, sd).compile().as_text()
print("scan hlo: copies", txt.count(" copy("), "dynamic-slice", txt.count("dynamic-slice("), "dyn-slice-fusion", txt.count("dynamic_slice_fusion"), "address_computation", txt.count("address_computation"))
del sg, su, sd

# dense einsum consumer
F = 18432
W1 = [mk(next(keys), (d, F)) for _ in range(L)]
W2 = [mk(next(keys), (F, d)) for _ in range(L)]
xb = mk(next(keys), (32, d))
@jax.jit
def dloop(x, W1, W2):
    for l in range(L):
        x = (jax.nn.silu(x @ W1[l]) @ W2[l]).astype(x.dtype)
    return x
print("dense loop    ms", timeit(dloop, xb, W1, W2), flush=True)
S1, S2 = jnp.stack(W1), jnp.stack(W2)
del W1, W2
@jax.jit
def dscan(x, S1, S2):
    return jax.lax.scan(lambda x, w: ((jax.nn.silu(x @ w[0]) @ w[1]).astype(x.dtype), None), x, (S1, S2))[0]
print("dense scan    ms", timeit(dscan, xb, S1, S2), flush=True)
@jax.jit
def dstatic(x, S1, S2):
    for l in range(L):
        x = (jax.nn.silu(x @ S1[l]) @ S2[l]).astype(x.dtype)
    return x
print("dense static  ms", timeit(dstatic, xb, S1, S2), flush=True)
@jax.jit
def dflat(x, S1, S2):
    # no slicing: contract against the whole stack with a one-hot layer selector folded into x
    for l in range(L):
        h = jnp.einsum("bd,ldf->bf", x, jax.lax.dynamic_slice_in_dim(S1, l, 1, 0))
        x = jnp.einsum("bf,lfd->bd", jax.nn.silu(h).astype(x.dtype), jax.lax.dynamic_slice_in_dim(S2, l, 1, 0)).astype(x.dtype)
    return x
print("dense dslice1 ms", timeit(dflat, xb, S1, S2), flush=True)
del S1, S2

# MLA decode on a cache: separate caches vs a stacked cache through scan xs/ys
b, S, H = 32, 2048, 128
q = mk(next(keys), (b, 1, H, 576))
caches = [mk(next(keys), (b, S, 576)) for _ in range(L)]
n = jnp.full((b,), 1500, jnp.int32)
new = mk(next(keys), (b, 1, 576))
def att(c, q):
    c = c.at[jnp.arange(b)[:, None], (n - 1)[:, None]].set(new)
    return ma.mla_decode(q, c, n, softmax_scale=0.1, v_head_dim=512), c
@jax.jit
def mloop(q, caches):
    out = []
    for l in range(L):
        o, c = att(caches[l], q); out.append(c); q = jnp.concatenate([o, q[..., 512:]], -1)
    return q, out
@jax.jit
def mscan(q, stacked):
    def body(q, c):
        o, c = att(c, q)
        return jnp.concatenate([o, q[..., 512:]], -1), c
    return jax.lax.scan(body, q, stacked)
mloop_d = jax.jit(mloop.__wrapped__, donate_argnums=1)
mscan_d = jax.jit(mscan.__wrapped__, donate_argnums=1)
print("mla loop      ms", timeit(mloop, q, caches), flush=True)
st = jnp.stack(caches)
print("mla scan      ms", timeit(mscan, q, st), flush=True)
