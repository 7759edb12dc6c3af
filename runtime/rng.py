"""torch.Generator("cpu")-compatible normal noise in numpy: `seed=S` gives diffusers' noise bit for bit.

ref: pytorch aten/src/ATen/core/MT19937RNGEngine.h (seeding), CPUGeneratorImpl.cpp (random64),
     ATen/core/TransformationHelper.h (uniform_real), ATen/core/DistributionsHelper.h (normal_distribution),
     ATen/native/cpu/DistributionTemplates.h (normal_kernel, normal_fill, NormalFill16), avx_mathfun.h.

How torch.randn draws on the CPU (matched against torch 2.13 on x86-64 / glibc):
- numel >= 16: uniforms in [0, 1), then Box-Muller on blocks of 16 (u[0:8] -> radius, u[8:16] -> angle,
  cos into the first 8, sin into the next 8); when numel % 16 != 0, 16 fresh uniforms redo the last 16.
  float32 uses the AVX2 kernel (AVX512 machines too: normal_stub has no AVX512 kernel): avx_mathfun's
  Cephes log / sincos in float32, with the FMAs the compiler fused (read off libtorch_cpu.so).
- numel < 16: one double-precision Box-Muller pair per two values; the sine half is cached in the
  generator and handed out by the next scalar draw, even one in a later call.
- float16: float32 uniforms and Box-Muller, 16 at a time, then cast (numel < 16: double -> float -> half).
Not reproduced: torch builds without the AVX2 kernel (ATEN_CPU_CAPABILITY=default, ARM) call libm's float
log/sin/cos instead; their float32 noise differs from this by up to ~2e-6.
"""

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import DTypeLike

_U32 = 0xFFFFFFFF


def _mt19937_key(seed: int) -> np.ndarray:
    # ref: MT19937RNGEngine.h init_with_uint32 (only the low 32 bits of the seed are used)
    key = np.empty(624, dtype=np.uint32)
    s = seed & _U32
    for i in range(624):
        key[i] = s
        s = (1812433253 * (s ^ (s >> 30)) + i + 1) & _U32
    return key


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add, rounded once (a*b of two float32s is exact in float64)."""
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    s = p + np.asarray(c, np.float64)
    # Rounding to float64 and then to float32 differs from one rounding only when the float64 sum sits
    # exactly halfway between two float32s (low 29 bits == 1 << 28) and was itself inexact: rare, fix those.
    tie = np.flatnonzero((s.view(np.uint64) & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000))
    if tie.size:
        t = s.flat[tie]
        p = np.broadcast_to(p, s.shape).flat[tie]
        q = np.broadcast_to(np.asarray(c, np.float64), s.shape).flat[tie]
        d = t - p
        err = (p - (t - d)) + (q - d)  # TwoSum: the exact p + q - t
        s.flat[tie] = np.where(err == 0, t, np.nextafter(t, np.where(err > 0, np.inf, -np.inf)))
    return s.astype(np.float32)


_f = np.float32
_LOG_P = [_f(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                          1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                          3.3333331174e-1)]  # fmt: skip
_LOG_Q1, _LOG_Q2, _SQRTHF = _f(-2.12194440e-4), _f(0.693359375), _f(0.707106781186547524)
_DP = [_f(-0.78515625), _f(-2.4187564849853515625e-4), _f(-3.77489497744594108e-8)]
_SIN_P = [_f(-1.9515295891e-4), _f(8.3321608736e-3), _f(-1.6666654611e-1)]
_COS_P = [_f(2.443315711809948e-005), _f(-1.388731625493765e-003), _f(4.166664568298827e-002)]
_FOPI, _TWO_PI = _f(1.27323954473516), _f(2.0 * math.pi)


def _log_avx2(u1: np.ndarray) -> np.ndarray:
    # ref: avx_mathfun.h log256_ps; u1 in [2**-24, 1], so no invalid or denormal lanes
    bits = u1.view(np.uint32)
    e = ((bits >> 23).astype(np.int32) - 126).astype(np.float32)
    x = ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F000000)).view(np.float32)  # mantissa in [0.5, 1)
    small = x < _SQRTHF
    e = e - small.astype(np.float32)
    x = (x - _f(1)) + np.where(small, x, _f(0))
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, x, p)
    y = _fma(y * x, z, e * _LOG_Q1)
    y = y - z * _f(0.5)
    return _fma(e, _LOG_Q2, x + y)


def _sincos_avx2(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # ref: avx_mathfun.h sincos256_ps; theta in [0, 2pi)
    j = (theta * _FOPI).astype(np.int32)
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    x = theta
    for dp in _DP:  # extended-precision x - j * pi/4
        x = _fma(y, dp, x)
    z = x * x
    yc = _fma(_fma(_COS_P[0], z, _COS_P[1]), z, _COS_P[2])
    yc = _fma(yc * z, z, -(z * _f(0.5))) + _f(1)
    ys = _fma(_fma(_SIN_P[0], z, _SIN_P[1]), z, _SIN_P[2])
    ys = _fma(ys * z, x, x)
    sin_poly = (j & 2) == 0
    sin = np.where(sin_poly, ys, yc)
    cos = np.where(sin_poly, yc, ys)
    sin = np.where((j & 4) != 0, -sin, sin)
    cos = np.where((~(j - 2) & 4) != 0, -cos, cos)
    return sin, cos


def _box_muller16_f32(u: np.ndarray) -> np.ndarray:
    # ref: DistributionTemplates.h NormalFill16<float> (AVX2); u: [n, 16] float32 uniforms
    radius = np.sqrt(_log_avx2(_f(1) - u[:, :8]) * _f(-2))
    sin, cos = _sincos_avx2(_TWO_PI * u[:, 8:])
    return np.concatenate([radius * cos, radius * sin], axis=1) + _f(0)  # fma(n, std=1, mean=0)


def _box_muller16_f64(u: np.ndarray) -> np.ndarray:
    # ref: NormalFill16<double>, scalar libm calls; numpy's float64 log differs from glibc in the last bit
    radius = np.sqrt(-2.0 * np.array([math.log(v) for v in (1.0 - u[:, :8]).ravel().tolist()]))
    theta = (2.0 * math.pi * u[:, 8:]).ravel().tolist()
    cos = radius * np.array([math.cos(t) for t in theta])
    sin = radius * np.array([math.sin(t) for t in theta])
    return np.concatenate([cos.reshape(-1, 8), sin.reshape(-1, 8)], axis=1) + 0.0


class TorchGenerator:
    """numpy twin of torch.Generator('cpu').manual_seed(seed)"""

    def __init__(self, seed: int):
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "TorchGenerator":
        seed = int(seed)
        if not -(2**63) <= seed < 2**64:  # torch's accepted range; negatives wrap to uint64
            raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
        self._seed = seed % 2**64
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": _mt19937_key(seed), "pos": 624}}
        self._next_double_normal: float | None = None  # torch's cached second Box-Muller value
        return self

    def initial_seed(self) -> int:
        return self._seed

    def _uniform24(self, n: int) -> np.ndarray:
        # ref: TransformationHelper.h uniform_real<float>: low 24 bits of one 32-bit draw
        raw = self._bits.random_raw(n)  # uint64 holding 32-bit words
        return (raw & np.uint64(0xFFFFFF)).astype(np.float32) * _f(2.0**-24)

    def _uniform53(self, n: int) -> np.ndarray:
        # ref: CPUGeneratorImpl random64 = (first << 32) | second; uniform_real<double>: low 53 bits
        raw = self._bits.random_raw(2 * n).reshape(n, 2)
        word = ((raw[:, 0] << np.uint64(32)) | raw[:, 1]) & np.uint64(2**53 - 1)
        return word.astype(np.float64) * 2.0**-53

    def _normal_double(self) -> float:
        # ref: DistributionsHelper.h normal_distribution<double>, with the generator's cached sample
        if self._next_double_normal is not None:
            value, self._next_double_normal = self._next_double_normal, None
            return value + 0.0
        u1, u2 = self._uniform53(2).tolist()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_double_normal = r * math.sin(theta)
        return r * math.cos(theta) + 0.0

    def randn(self, shape: int | Sequence[int], dtype: DTypeLike = np.float32) -> np.ndarray:
        """== torch.randn(shape, generator=g, dtype=dtype) for float32, float64 and float16."""
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64, np.float16):
            raise TypeError(f"randn supports float32, float64 and float16, not {dtype}")
        n = math.prod(shape)
        if n < 16:  # ref: normal_kernel serial path; Half(double) goes through float
            out = np.array([self._normal_double() for _ in range(n)], dtype=np.float64)
            if dtype != np.float64:
                out = out.astype(np.float32)
            return out.astype(dtype, copy=False).reshape(shape)
        if dtype == np.float64:
            uniform, box_muller = self._uniform53, _box_muller16_f64
        else:
            uniform, box_muller = self._uniform24, _box_muller16_f32
        full = n - n % 16
        # float32/float64 draw all n uniforms in place first; float16 fills 16 at a time (opmath buffer),
        # so it never draws the uniforms of the tail that gets redone.
        u = uniform(n if dtype != np.float16 else full)
        out = np.empty(n, dtype=u.dtype)
        out[:full] = box_muller(u[:full].reshape(-1, 16)).ravel()
        if n % 16:  # redo the last 16 from fresh uniforms
            out[n - 16 :] = box_muller(uniform(16).reshape(1, 16)).ravel()
        return out.astype(dtype, copy=False).reshape(shape)


def randn_tensor(
    shape: Sequence[int],
    generators: "TorchGenerator | Sequence[TorchGenerator]",
    dtype: DTypeLike = np.float32,
) -> np.ndarray:
    """diffusers.utils.torch_utils.randn_tensor for CPU generators: one generator, or one per batch item."""
    # ref: diffusers randn_tensor (a list of one generator is treated as that generator)
    shape = tuple(int(s) for s in shape)
    if isinstance(generators, (list, tuple)) and len(generators) == 1:
        generators = generators[0]
    if not isinstance(generators, (list, tuple)):
        return generators.randn(shape, dtype)
    if len(generators) < shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    return np.concatenate([generators[i].randn((1,) + shape[1:], dtype) for i in range(shape[0])], axis=0)
