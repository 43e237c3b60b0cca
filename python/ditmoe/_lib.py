"""ctypes declarations of libditmoe.so (include/ditmoe.h). Internal to the ditmoe package.

The library is found, in order: $DITMOE_LIB (a path to the .so); the build tree
(<repo>/build/lib, this file being <repo>/python/ditmoe/_lib.py); an installed prefix
(<prefix>/lib, this file being <prefix>/share/ditmoe/python/ditmoe/_lib.py); the loader's
default search (libditmoe.so.0)."""
import ctypes
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))          # <repo> or <prefix>/share/ditmoe


def _candidates():
    env = os.environ.get("DITMOE_LIB")
    if env:
        yield env
    yield os.path.join(ROOT, "build", "lib", "libditmoe.so")
    yield os.path.join(ROOT, "..", "..", "lib", "libditmoe.so")
    yield "libditmoe.so.0"


def _load():
    errors = []
    for c in _candidates():
        if os.sep in c and not os.path.exists(c):
            continue
        try:
            return ctypes.CDLL(c)
        except OSError as e:
            errors.append(f"{c}: {e}")
    raise ImportError("ditmoe: libditmoe.so not found (build it with cmake, or set DITMOE_LIB); "
                      + "; ".join(errors))


lib = _load()

c_int, c_float, c_double, c_char_p, c_void_p = (ctypes.c_int, ctypes.c_float, ctypes.c_double,
                                                ctypes.c_char_p, ctypes.c_void_p)
P = ctypes.POINTER
MAX_CLASS_NAME = 64


class Config(ctypes.Structure):          # dm_config
    _fields_ = [(n, c_int) for n in (
        "arch", "attn", "hidden", "depth", "heads", "num_experts", "top_k", "expert_hidden",
        "shared_hidden", "patch", "input_size", "in_channels", "out_channels", "learn_sigma",
        "num_classes")] + [
        ("class_names", P(ctypes.c_char * MAX_CLASS_NAME)), ("objective", c_int),
        ("vae_scale", c_float), ("name", ctypes.c_char * 64), ("moe_interleave", c_int),
        ("mlp_hidden", c_int), ("promoe_ec", c_int), ("router_act", c_int),
        ("qk_norm_eps", c_float), ("time_scale", c_float), ("default_sampler", ctypes.c_char * 16),
        ("default_steps", c_int), ("default_cfg_scale", c_float), ("cfg_channels", c_int)]


class SampleParams(ctypes.Structure):    # dm_sample_params
    _fields_ = [("sampler", c_int), ("steps", c_int), ("cfg_scale", c_float),
                ("cfg_channels", c_int), ("cfg_t_lo", c_float), ("cfg_t_hi", c_float),
                ("eta", c_float), ("seed", ctypes.c_uint64), ("num_train_steps", c_int),
                ("sc_w", c_float), ("sc_weak", c_int), ("sc_replace", c_int)]


class LabOpts(ctypes.Structure):         # dm_lab_opts (MoE lab, issue 14)
    _fields_ = [("route", c_char_p), ("skip_routed", c_char_p), ("expert_cache", c_char_p)]


class ConfigOverrides(ctypes.Structure):  # dm_config_overrides
    _fields_ = [("heads", c_int), ("top_k", c_int), ("num_classes", c_int),
                ("objective", c_char_p), ("class_names", c_char_p), ("name", c_char_p),
                ("promoe_variant", c_char_p), ("router", c_char_p), ("vae_scale", c_double),
                ("sampler", c_char_p), ("steps", c_int), ("cfg_scale", c_double),
                ("cfg_channels", c_int)]


class LoadOpts(ctypes.Structure):        # dm_load_opts
    _fields_ = [("backend", c_int), ("device", c_int), ("cfg", P(ConfigOverrides)),
                ("precision", c_int), ("quant_experts", c_int)]


class Routes(ctypes.Structure):          # dm_routes
    _fields_ = [("ids", P(ctypes.c_int32)), ("weights", P(c_float))]


PROGRESS = ctypes.CFUNCTYPE(None, c_void_p, c_int, c_int)

HAVE_PIPELINE = hasattr(lib, "dm_pipeline_open")
if HAVE_PIPELINE:
    class PipelineOpts(ctypes.Structure):   # dm_pipeline_opts
        _fields_ = [("model_path", c_char_p), ("vae_path", c_char_p), ("backend", c_int),
                    ("device", c_int), ("threads", c_int), ("cfg", P(ConfigOverrides)),
                    ("precision", c_int), ("quant_experts", c_int), ("lab", LabOpts)]

    class PipelineInfo(ctypes.Structure):   # dm_pipeline_info
        _fields_ = [("latent_channels", c_int), ("latent_size", c_int), ("width", c_int),
                    ("height", c_int), ("channels", c_int), ("latent_rescale", c_float)]

    class PipelineHooks(ctypes.Structure):  # dm_pipeline_hooks
        _fields_ = [("progress", PROGRESS), ("progress_ctx", c_void_p), ("trace", c_void_p),
                    ("init", P(c_float)), ("latents", P(c_float))]


class TraceShape(ctypes.Structure):      # dm_trace_shape
    _fields_ = [("layers", c_int), ("moe_layers", c_int * 256), ("grid_h", c_int),
                ("grid_w", c_int), ("top_k", c_int), ("num_experts", c_int),
                ("uncond_expert", c_int), ("num_classes", c_int), ("steps", c_int),
                ("heun", c_int), ("weights", c_int)]


class TraceRecord(ctypes.Structure):     # dm_trace_record
    _fields_ = [("batch", c_int), ("eval", c_int), ("step", c_int), ("rows", c_int),
                ("image", P(ctypes.c_int64)), ("label", P(ctypes.c_int64)),
                ("cls", P(ctypes.c_int64)), ("t", P(c_float)), ("uncond", P(ctypes.c_uint8)),
                ("ids", P(ctypes.c_int32)), ("weights", P(c_float)),
                ("token_flags", P(ctypes.c_uint8))]


def _sig(name, restype, *args):
    f = getattr(lib, name, None)
    if f is not None:
        f.restype, f.argtypes = restype, list(args)


_sig("dm_last_error", c_char_p)
_sig("dm_set_threads", None, c_int)
_sig("dm_get_threads", c_int)
_sig("dm_load_opts_init", None, P(LoadOpts))
_sig("dm_config_overrides_init", None, P(ConfigOverrides))
_sig("dm_backend_from_name", c_int, c_char_p, P(c_int))
_sig("dm_precision_from_name", c_int, c_char_p, P(c_int))
_sig("dm_quant_from_name", c_int, c_char_p, P(c_int))
_sig("dm_model_load_opts", c_int, c_char_p, P(LoadOpts), P(c_void_p))
_sig("dm_model_free", None, c_void_p)
_sig("dm_model_config", P(Config), c_void_p)
_sig("dm_config_moe_layers", c_int, P(Config))
_sig("dm_model_forward", c_int, c_void_p, c_int, P(c_float), P(c_float), P(ctypes.c_int64),
     P(c_float), P(Routes))
_sig("dm_config_class_id", c_int, P(Config), c_char_p, P(c_int))
_sig("dm_sample_params_init", None, P(SampleParams), P(Config))
_sig("dm_sample_params_check", c_int, P(SampleParams), P(Config))
_sig("dm_sampler_from_name", c_int, c_char_p, P(c_int))
_sig("dm_sampler_name", c_char_p, c_int)
_sig("dm_trace_shape_from_model", None, P(TraceShape), P(Config), P(SampleParams))
_sig("dm_trace_open", c_int, c_char_p, P(TraceShape), P(Config), c_char_p, P(SampleParams),
     P(c_void_p))
_sig("dm_trace_close", c_int, c_void_p)
_sig("dm_model_set_lab", c_int, c_void_p, P(LabOpts))
_sig("dm_model_lab_free", None, c_void_p)
_sig("dm_model_lab_string", c_char_p, c_void_p, c_char_p)
_sig("dm_model_route_slots", c_int, c_void_p)
_sig("dm_self_contrast_set", c_int, P(SampleParams), c_char_p)
_sig("dm_trace_abort", None, c_void_p)
_sig("dm_trace_read_open", c_int, c_char_p, P(c_void_p))
_sig("dm_trace_read_shape", P(TraceShape), c_void_p)
_sig("dm_trace_read_header", c_char_p, c_void_p)
_sig("dm_trace_read_next", c_int, c_void_p, P(P(TraceRecord)))
_sig("dm_trace_read_close", None, c_void_p)
if HAVE_PIPELINE:
    _sig("dm_pipeline_opts_init", None, P(PipelineOpts))
    _sig("dm_pipeline_open", c_int, P(PipelineOpts), P(c_void_p))
    _sig("dm_pipeline_free", None, c_void_p)
    _sig("dm_pipeline_model", c_void_p, c_void_p)
    _sig("dm_pipeline_config", P(Config), c_void_p)
    _sig("dm_pipeline_get_info", P(PipelineInfo), c_void_p)
    _sig("dm_pipeline_generate", c_int, c_void_p, P(SampleParams), c_int, P(ctypes.c_int64),
         P(ctypes.c_uint64), P(PipelineHooks), P(ctypes.c_uint8))
