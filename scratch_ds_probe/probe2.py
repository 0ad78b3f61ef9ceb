# Temporary probe (deepseek helper): experts of all layers as one [L*E] group axis (no slice copies).
import time, sys, types
import jax, jax.numpy as jnp, numpy as np
pkg = types.ModuleType('vishwam_jax'); pkg.__path__ = ['vishwam_jax']; sys.modules['vishwam_jax'] = pkg
from vishwam_jax.pallas_kernels import grouped_matmul as gm

def timeit(fn, *a, iters=20):
    jax.block_until_ready(fn(*a)); jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(iters):
        t = time.perf_counter(); jax.block_until_ready(fn(*a)); ts.append(time.perf_counter() - t)
    return np.median(ts) * 1e3

L, E, d, f = 4, 64, 7168, 2048
keys = iter(jax.random.split(jax.random.key(0), 64))
mk = jax.jit(lambda k, s: (jax.random.normal(k, s, jnp.float32) * 0.02).astype(jnp.bfloat16), static_argnums=1)
sg, su, sd = mk(next(keys), (L, E, d, f)), mk(next(keys), (L, E, d, f)), mk(next(keys), (L, E, f, d))
for rows in (8, 256):
    x = mk(next(keys), (rows, d))
    gs = jnp.asarray(np.bincount(np.random.default_rng(0).integers(0, E, rows), minlength=E), jnp.int32)
    def layer(x, gw, uw, dw, g):
        h = jax.nn.silu(gm.gmm(x, gw, g, preferred_element_type=x.dtype)) * gm.gmm(x, uw, g, preferred_element_type=x.dtype)
        return gm.gmm(h, dw, g, preferred_element_type=x.dtype)
    @jax.jit
    def static(x, sg, su, sd):
        for l in range(L):
            x = layer(x, sg[l], su[l], sd[l], gs)
        return x
    @jax.jit
    def flat_scan(x, sg, su, sd):
        fg, fu, fd = (w.reshape((L * E,) + w.shape[2:]) for w in (sg, su, sd))
        def body(x, l):
            g = jax.lax.dynamic_update_slice(jnp.zeros((L * E,), jnp.int32), gs, (l * E,))
            return layer(x, fg, fu, fd, g), None
        return jax.lax.scan(body, x, jnp.arange(L))[0]
    ref = static(x, sg, su, sd)
    np.testing.assert_allclose(np.asarray(flat_scan(x, sg, su, sd), np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)
    print(rows, "rows: gmm static slices ms", timeit(static, x, sg, su, sd), " flat [L*E] scan ms", timeit(flat_scan, x, sg, su, sd), flush=True)
del sg, su, sd
# XLA dots in a scan, with per-compile options instead of XLA_FLAGS
F = 18432
S1, S2 = mk(next(keys), (L, d, F)), mk(next(keys), (L, F, d))
xb = mk(next(keys), (32, d))
def dscan(x, S1, S2):
    return jax.lax.scan(lambda x, w: ((jax.nn.silu(x @ w[0]) @ w[1]).astype(x.dtype), None), x, (S1, S2))[0]
plain = jax.jit(dscan).lower(xb, S1, S2).compile()
opts = jax.jit(dscan).lower(xb, S1, S2).compile(compiler_options={"xla_gpu_enable_dynamic_slice_fusion": True, "xla_gpu_enable_triton_gemm": False})
print("dense scan ms", timeit(plain, xb, S1, S2), " with compiler_options ms", timeit(opts, xb, S1, S2), flush=True)
