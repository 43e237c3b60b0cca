"""ditmoe: Mixture-of-Experts diffusion transformers (DiT-MoE, ProMoE) from Python.

A thin ctypes layer over libditmoe.so (no build step, no network): numpy arrays in and out,
the library's own code and numbers underneath, so images equal the CLI's for the same seed.

    import ditmoe
    pipe = ditmoe.Pipeline()                      # the shipped Fashion-MNIST model + VAE
    images = pipe.generate(["sneaker", 3], n=2, steps=20, seed=7)   # uint8 [4, H, W, C]

    m = ditmoe.Model("dit_moe_s_8E2A.pt", heads=None)   # .safetensors or .pt/.pth
    out = m.forward(x, t, y)                      # x [B,C,H,W] f32, t [B], y [B] -> [B,Cout,H,W]

Errors raise ditmoe.Error carrying the library's one-line message (and .status). See
docs/python.md.
"""
import ctypes
import os
import tempfile

import numpy as np

from . import _lib
from ._lib import lib

__all__ = ["Error", "Model", "Pipeline", "default_asset", "read_routes", "__version__"]
__version__ = "0.1.0"

_STATUS = {1: "ARG", 2: "IO", 3: "FORMAT", 4: "NOMEM", 5: "NUMERIC", 6: "WRITE", 7: "BACKEND"}


class Error(Exception):
    """A library call failed: str(e) is the library's message, e.status its dm_status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.kind = _STATUS.get(status, str(status))


def _check(st):
    if st != 0:
        raise Error(st, (lib.dm_last_error() or b"").decode("utf-8", "replace"))


def default_asset(name):
    """A shipped file (assets/ of the source tree, or <prefix>/share/ditmoe/assets)."""
    for d in (os.environ.get("DITMOE_ASSETS"), os.path.join(_lib.ROOT, "assets")):
        if d and os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise Error(2, f"{name}: default asset not found (looked in $DITMOE_ASSETS and "
                   f"{os.path.join(_lib.ROOT, 'assets')})")


def _backend(name):
    k = ctypes.c_int()
    if lib.dm_backend_from_name(str(name).encode(), ctypes.byref(k)) != 0:
        raise Error(1, f"backend {name!r}: expected cpu or cuda")
    return k.value


def _overrides(kw):
    """dm_config_overrides from the converter's flag names (heads=, top_k=, ...)."""
    if not kw:
        return None
    ov = _lib.ConfigOverrides()
    lib.dm_config_overrides_init(ctypes.byref(ov))
    for k, v in kw.items():
        if v is None:
            continue
        if not hasattr(ov, k):
            raise TypeError(f"unknown model option {k!r}")
        setattr(ov, k, os.fsencode(v) if isinstance(v, (str, os.PathLike)) else v)
    return ov


class _ConfigView:
    """Read-only view of a dm_config (the fields users ask for)."""

    def __init__(self, c):
        self.arch = ("dit-moe", "promoe")[c.arch]
        self.name = c.name.decode("utf-8", "replace")
        self.hidden_size, self.depth, self.num_heads = c.hidden, c.depth, c.heads
        self.num_experts, self.top_k = c.num_experts, c.top_k
        self.in_channels, self.out_channels = c.in_channels, c.out_channels
        self.input_size, self.patch_size, self.num_classes = c.input_size, c.patch, c.num_classes
        self.objective = ("ddpm", "rf")[c.objective]
        self.class_names = ([c.class_names[i].value.decode("utf-8", "replace")
                             for i in range(c.num_classes)] if c.class_names else None)
        self.moe_layers = lib.dm_config_moe_layers(ctypes.byref(c))

    def __repr__(self):
        return (f"Config({self.arch} {self.name or ''} D={self.hidden_size} L={self.depth} "
                f"H={self.num_heads} E={self.num_experts} k={self.top_k} {self.objective}, "
                f"{self.num_classes} classes)")


def _f32(a, shape=None, name="array"):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name}: shape {a.shape} expected {shape}")
    return a


def _precision(precision, quant_experts):
    """-> (dm_precision, bits) from "f32"|"bf16" and "none"|"int8"|"int4" (issue 13). "bf16" is
    the CLI's --precision bf16: attention and expert GEMMs in bf16, the router, embedders, adaLN
    and final layer in float32."""
    p, q = ctypes.c_int(), ctypes.c_int()
    if lib.dm_precision_from_name(str(precision).encode(), ctypes.byref(p)) != 0:
        raise Error(2, f"precision {precision!r}: expected f32 or bf16")
    if lib.dm_quant_from_name(str(quant_experts or "none").encode(), ctypes.byref(q)) != 0:
        raise Error(2, f"quant_experts {quant_experts!r}: expected none, int8 or int4")
    return p.value, q.value


def _lab_opts(route, skip_routed, expert_cache):
    """dm_lab_opts from the MoE-lab options (strings as the CLI flags; skip_routed may be a
    list of rules)."""
    if isinstance(skip_routed, (list, tuple)):
        skip_routed = ";".join(skip_routed)
    enc = lambda v: None if v is None else str(v).encode()
    return _lib.LabOpts(enc(route), enc(skip_routed), enc(expert_cache))


class Model:
    """The transformer alone (parity work): Model(path, backend="cpu", precision="f32",
    quant_experts="none", **overrides).

    path: .safetensors or a PyTorch checkpoint (.pt/.pth, read without executing it).
    overrides: what a .pt's weights cannot tell, as tools/convert_checkpoint.py's flags
    (heads, top_k, objective, num_classes, class_names, name, promoe_variant, router, vae_scale).
    """

    def __init__(self, path, backend="cpu", device=0, precision="f32", quant_experts="none",
                 route=None, skip_routed=None, expert_cache=None, **overrides):
        self._m = ctypes.c_void_p()
        lo = _lib.LoadOpts()
        lib.dm_load_opts_init(ctypes.byref(lo))
        lo.backend, lo.device = _backend(backend), device
        lo.precision, lo.quant_experts = _precision(precision, quant_experts)
        self._ov = _overrides(overrides)          # kept alive while loading
        if self._ov is not None:
            lo.cfg = ctypes.pointer(self._ov)
        self.path = os.fspath(path)
        _check(lib.dm_model_load_opts(os.fsencode(self.path), ctypes.byref(lo),
                                      ctypes.byref(self._m)))
        self._cfg = lib.dm_model_config(self._m).contents
        self.config = _ConfigView(self._cfg)
        self._lab = _lab_opts(route, skip_routed, expert_cache)
        _check(lib.dm_model_set_lab(self._m, ctypes.byref(self._lab)))

    def close(self):
        if getattr(self, "_m", None):
            lib.dm_model_free(self._m)
            self._m = None

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def forward(self, x, t, y, routes=False):
        """out = model(x, t, y): x [B,C,H,W] float32, t [B] (fed to the timestep embedder as
        given), y [B] class ids (null class = num_classes) -> out [B,Cout,H,W] float32.
        routes=True also returns (ids [L_moe, B*T, k] int32, weights [L_moe, B*T, k] float32)."""
        c = self.config
        x = np.asarray(x)
        B = x.shape[0] if x.ndim == 4 else -1
        x = _f32(x, (B, c.in_channels, c.input_size, c.input_size), "x")
        t = _f32(t, (B,), "t")
        y = np.ascontiguousarray(y, dtype=np.int64)
        if y.shape != (B,):
            raise ValueError(f"y: shape {y.shape} expected {(B,)}")
        out = np.empty((B, c.out_channels, c.input_size, c.input_size), np.float32)
        r = None
        if routes:
            T = (c.input_size // c.patch_size) ** 2
            k = lib.dm_model_route_slots(self._m)   # the routing policy's most picks
            ids = np.empty((c.moe_layers, B * T, k), np.int32)
            w = np.empty((c.moe_layers, B * T, k), np.float32)
            r = _lib.Routes(ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                            w.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        fp = ctypes.POINTER(ctypes.c_float)
        _check(lib.dm_model_forward(self._m, B, x.ctypes.data_as(fp), t.ctypes.data_as(fp),
                                    y.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                                    out.ctypes.data_as(fp), ctypes.byref(r) if r else None))
        return (out, (ids, w)) if routes else out


class Pipeline:
    """Model + VAE -> images: Pipeline(model=None, vae=None, backend="cpu", threads=0,
    precision="f32", quant_experts="none", **overrides) (precision "bf16"; quant_experts "int8" |
    "int4"; overrides: what a .pt file cannot tell, as Model takes them).

    model / vae default to the shipped Fashion-MNIST files. threads: 0 = all cores.
    model may be a PyTorch checkpoint (.pt/.pth); overrides are what its weights cannot tell, as
    Model's and the CLI's flags (heads, top_k, objective, num_classes, class_names,
    promoe_variant, router, vae_scale)."""

    def __init__(self, model=None, vae=None, backend="cpu", threads=0, device=0, precision="f32",
                 quant_experts="none", route=None, skip_routed=None, expert_cache=None,
                 **overrides):
        if not _lib.HAVE_PIPELINE:
            raise Error(1, "this libditmoe.so has no generation pipeline (dm_pipeline_open)")
        self.model_path = os.fspath(model) if model else default_asset("ditmoe-fmnist.safetensors")
        self.vae_path = os.fspath(vae) if vae else default_asset("vae-fmnist.safetensors")
        o = _lib.PipelineOpts()
        lib.dm_pipeline_opts_init(ctypes.byref(o))
        o.model_path, o.vae_path = os.fsencode(self.model_path), os.fsencode(self.vae_path)
        o.backend, o.device, o.threads = _backend(backend), device, int(threads)
        self._ov = _overrides(overrides)          # kept alive while opening
        if self._ov is not None:
            o.cfg = ctypes.pointer(self._ov)
        o.precision, o.quant_experts = _precision(precision, quant_experts)
        self._labopts = _lab_opts(route, skip_routed, expert_cache)  # keeps the strings alive
        o.lab = self._labopts
        self._p = ctypes.c_void_p()
        _check(lib.dm_pipeline_open(ctypes.byref(o), ctypes.byref(self._p)))
        self._cfg = lib.dm_pipeline_config(self._p).contents
        self.config = _ConfigView(self._cfg)
        self.info = lib.dm_pipeline_get_info(self._p).contents

    def close(self):
        if getattr(self, "_p", None):
            lib.dm_pipeline_free(self._p)
            self._p = None

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def class_id(self, c):
        """A class id from an int or a name in the model's table (ValueError-free: Error)."""
        out = ctypes.c_int()
        _check(lib.dm_config_class_id(ctypes.byref(self._cfg), str(c).encode(), ctypes.byref(out)))
        return out.value

    def params(self, steps=None, seed=None, cfg_scale=None, sampler=None, cfg_channels=None,
               cfg_interval=None, eta=None, self_contrast=None):
        """dm_sample_params: the model's defaults with the given fields replaced, checked."""
        p = _lib.SampleParams()
        lib.dm_sample_params_init(ctypes.byref(p), ctypes.byref(self._cfg))
        if sampler is not None:
            k = ctypes.c_int()
            if lib.dm_sampler_from_name(str(sampler).encode(), ctypes.byref(k)) != 0:
                raise Error(1, f"sampler {sampler!r}: expected ddpm, ddim, euler or heun")
            p.sampler = k.value
        if steps is not None:
            p.steps = int(steps)
        if cfg_scale is not None:
            p.cfg_scale = float(cfg_scale)
        if cfg_channels is not None:
            p.cfg_channels = 0 if cfg_channels == "all" else int(cfg_channels)
        if cfg_interval is not None:
            p.cfg_t_lo, p.cfg_t_hi = (float(v) for v in cfg_interval)
        if eta is not None:
            p.eta = float(eta)
        if self_contrast is not None:
            _check(lib.dm_self_contrast_set(ctypes.byref(p), str(self_contrast).encode()))
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") % (1 << 53)
        p.seed = int(seed)
        _check(lib.dm_sample_params_check(ctypes.byref(p), ctypes.byref(self._cfg)))
        return p

    def generate(self, classes, n=1, steps=None, seed=None, cfg_scale=None, sampler=None,
                 cfg_channels=None, cfg_interval=None, eta=None, batch=4, routing=False,
                 progress=None, self_contrast=None):
        """Images for every class (id or name), n each, in the order ditmoe-sample makes them
        (image i = class classes[i // n], noise key i): uint8 [N, H, W, C]. The same seed and
        parameters give exactly the CLI's pixels. seed=None draws one (self.last_seed).
        routing=True also returns the routing record: a list with one dict per denoiser
        evaluation (batch, eval, step, image [R], label [R], t [R], ids [Lm, R, T, k],
        weights [Lm, R, T, k] or None). progress(step, nsteps) is called after each step."""
        if isinstance(classes, (int, str, np.integer)):
            classes = [classes]
        ids = [self.class_id(c) for c in classes]
        p = self.params(steps, seed, cfg_scale, sampler, cfg_channels, cfg_interval, eta,
                        self_contrast)
        self.last_seed = p.seed
        N = len(ids) * int(n)
        info = self.info
        pix = np.empty((N, info.height, info.width, info.channels), np.uint8)
        trace, tmp = ctypes.c_void_p(), None
        if routing:
            shape = _lib.TraceShape()
            lib.dm_trace_shape_from_model(ctypes.byref(shape), ctypes.byref(self._cfg),
                                          ctypes.byref(p))
            shape.top_k = lib.dm_model_route_slots(lib.dm_pipeline_model(self._p))
            fd, tmp = tempfile.mkstemp(prefix="ditmoe-routes-", suffix=".bin")
            os.close(fd)
            _check(lib.dm_trace_open(tmp.encode(), ctypes.byref(shape), ctypes.byref(self._cfg),
                                     os.fsencode(self.model_path), ctypes.byref(p),
                                     ctypes.byref(trace)))
        cb = _lib.PROGRESS(lambda ctx, s, ns: progress(s, ns)) if progress else _lib.PROGRESS()
        try:
            B = max(1, min(int(batch), N))
            for i0 in range(0, N, B):
                nb = min(B, N - i0)
                y = np.array([ids[i // n] for i in range(i0, i0 + nb)], np.int64)
                index = np.arange(i0, i0 + nb, dtype=np.uint64)
                hooks = _lib.PipelineHooks(cb, None, trace, None, None)
                _check(lib.dm_pipeline_generate(
                    self._p, ctypes.byref(p), nb, y.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                    index.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64)), ctypes.byref(hooks),
                    pix[i0:].ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))))
            if not routing:
                return pix
            tr, trace = trace, ctypes.c_void_p()
            _check(lib.dm_trace_close(tr))
            return pix, _read_routes(tmp)
        finally:
            if trace:
                lib.dm_trace_abort(trace)
            if tmp and os.path.exists(tmp):
                os.remove(tmp)


def read_routes(path):
    """A routing dump (docs/routing.md) as (header dict, records): one dict per evaluation with
    batch, eval, step, image [R], label [R], t [R], kind [R] (0 cond, 1 uncond, 2 self-contrast
    weak), ids [Lm, R, T, k] (-1 = none), weights or None, token_flags [Lm, R, T] or None."""
    import json
    r = ctypes.c_void_p()
    _check(lib.dm_trace_read_open(os.fsencode(path), ctypes.byref(r)))
    try:
        head = json.loads(lib.dm_trace_read_header(r).decode())
    finally:
        lib.dm_trace_read_close(r)
    return head, _read_routes(os.fsdecode(path))


def _read_routes(path):
    r = ctypes.c_void_p()
    _check(lib.dm_trace_read_open(path.encode(), ctypes.byref(r)))
    try:
        s = lib.dm_trace_read_shape(r).contents
        T, k, L = s.grid_h * s.grid_w, s.top_k, s.layers
        out = []
        while True:
            rec = ctypes.POINTER(_lib.TraceRecord)()
            _check(lib.dm_trace_read_next(r, ctypes.byref(rec)))
            if not rec:
                return out
            e = rec.contents
            R = e.rows

            def arr(ptr, shape, dt):
                return np.ctypeslib.as_array(ptr, shape=shape).astype(dt, copy=True)

            out.append({"batch": e.batch, "eval": e.eval, "step": e.step,
                        "image": arr(e.image, (R,), np.int64),
                        "label": arr(e.label, (R,), np.int64),
                        "t": arr(e.t, (R,), np.float32),
                        "ids": arr(e.ids, (L, R, T, k), np.int32),
                        "weights": arr(e.weights, (L, R, T, k), np.float32) if e.weights else None,
                        "kind": arr(e.uncond, (R,), np.uint8),   # 0 cond, 1 uncond, 2 weak
                        "token_flags": (arr(e.token_flags, (L, R, T), np.uint8)
                                        if e.token_flags else None)})
    finally:
        lib.dm_trace_read_close(r)
