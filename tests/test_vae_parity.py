"""VAE decoder: C tool (build/bin/ditmoe-vae-decode) vs the PyTorch reference tests/ref/vae_ref.py.

Tolerance: max|C - ref| <= 1e-4 * RMS(ref) per decoded batch, the reference run in float64 from the
same float32 weights (so the bound measures our float32 error only). Files are written in all
naming schemes (diffusers current, diffusers-0.4.2 legacy query/key/value/proj_attn, ldm bare and
ldm with "first_stage_model."), with encoder tensors that must be ignored. Also: the full SD-VAE
tensor list (Appendix 1) loads in every scheme, and bad inputs fail with exit 2 and a clear message.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

SRC = os.environ.get("DITMOE_SRC", os.path.join(os.path.dirname(__file__), ".."))
BIN = os.environ.get("DITMOE_BIN", os.path.join(SRC, "build", "bin"))
sys.path.insert(0, os.path.join(SRC, "tests", "ref"))
import vae_ref as V  # noqa: E402

TOOL = os.path.join(BIN, "ditmoe-vae-decode")
REL_TOL = 1e-4
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def run(args):
    p = subprocess.run([TOOL, "-q", "--threads", "2"] + args, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def encoder_junk(zc):
    g = torch.Generator().manual_seed(5)
    return {"encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
            "encoder.conv_in.bias": torch.randn(8, generator=g),
            "quant_conv.weight": torch.randn(2 * zc, 2 * zc, 1, 1, generator=g),
            "quant_conv.bias": torch.randn(2 * zc, generator=g)}


def schemes(sd, L):
    return {"diffusers": sd, "legacy": V.to_legacy(sd), "ldm": V.to_ldm(sd, L),
            "ldm-prefixed": V.to_ldm(sd, L, prefix="first_stage_model.")}


def with_junk(name, tensors, zc):
    junk = encoder_junk(zc)
    if name == "ldm-prefixed":
        junk = {"first_stage_model." + k: v for k, v in junk.items()}
    return {**junk, **tensors}


def parity(tmp, label, cfg, B, h, w, metadata, scale):
    dec = V.randomize_(V.Decoder(cfg), seed=hash(label) % 1000)
    sd = dec.state_dict()
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(B, cfg.z_channels, h, w, generator=g) * scale).float()
    ref = dec.double().decode(z.double(), scale).numpy()
    dec.float()
    zp = os.path.join(tmp, label + "_z.npy")
    np.save(zp, z.numpy())
    rms = float(np.sqrt(np.mean(ref ** 2)))
    L = len(cfg.ch_mult)
    for sname, tensors in schemes(sd, L).items():
        vp = os.path.join(tmp, f"{label}_{sname}.safetensors")
        V.write_safetensors(vp, with_junk(sname, tensors, cfg.z_channels), metadata)
        op = os.path.join(tmp, f"{label}_{sname}_img.npy")
        rc, out = run(["--vae", vp, "--z", zp, "--out", op])
        if rc != 0:
            check(False, f"{label} [{sname}]: tool exit {rc}: {out.strip()}")
            continue
        img = np.load(op)
        shape_ok = img.shape == ref.shape
        err = float(np.max(np.abs(img - ref))) if shape_ok else float("inf")
        check(shape_ok and err <= REL_TOL * rms,
              f"{label} [{sname}]: shape {img.shape} vs {ref.shape}, max|diff| {err:.3g} "
              f"<= {REL_TOL:g} x RMS {rms:.3g}")
    return dec, z, ref


def png_check(tmp, cfg_label, z, ref):
    """--png writes PREFIX_i.png with DiT's mapping; compare with the float reference mapped the
    same way (u8 = trunc(clamp(127.5 x + 128, 0, 255))), allowing +-1 flips at rounding edges."""
    import matplotlib.image as mpimg
    vp = os.path.join(tmp, f"{cfg_label}_diffusers.safetensors")
    zp = os.path.join(tmp, cfg_label + "_z.npy")
    prefix = os.path.join(tmp, cfg_label + "_png")
    rc, out = run(["--vae", vp, "--z", zp, "--png", prefix])
    check(rc == 0, f"{cfg_label}: --png exit {rc} {out.strip()[:200]}")
    if rc != 0:
        return
    for b in range(ref.shape[0]):
        path = f"{prefix}_{b}.png"
        if not os.path.exists(path):
            check(False, f"{path} written")
            continue
        got = np.round(mpimg.imread(path) * 255).astype(np.int32)
        exp = np.clip(127.5 * ref[b] + 128.0, 0, 255).astype(np.int32)
        exp = exp.transpose(1, 2, 0)
        if exp.shape[2] == 1:
            exp = exp[:, :, 0]
        if got.ndim == 3 and got.shape[2] == 4 and exp.ndim == 3 and exp.shape[2] == 3:
            got = got[:, :, :3]
        ok = got.shape == exp.shape and int(np.max(np.abs(got - exp))) <= 1
        check(ok, f"{path}: shape {got.shape} vs {exp.shape}, max pixel diff "
                  f"{int(np.max(np.abs(got - exp))) if got.shape == exp.shape else -1} <= 1")


def expect_fail(label, args, needles, codes=(2,)):
    """Bad input: exit code in `codes` (2 = bad input; 1 = I/O failure such as a missing file)
    and every needle in the message."""
    rc, out = run(args)
    ok = rc in codes and all(n in out for n in needles)
    check(ok, f"bad input {label}: exit {rc} (want {codes}), message: {out.strip()[:300]}")


def bad_inputs(tmp):
    cfg = V.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, out_ch=3)
    sd = V.randomize_(V.Decoder(cfg), seed=3).state_dict()
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    zp = os.path.join(tmp, "bad_z.npy")
    np.save(zp, z)
    out = os.path.join(tmp, "bad_out.npy")

    p = os.path.join(tmp, "missing.safetensors")
    d = dict(sd)
    del d["decoder.up_blocks.0.resnets.1.conv2.bias"]
    V.write_safetensors(p, d)
    expect_fail("missing tensor", ["--vae", p, "--z", zp, "--out", out],
                ["missing.safetensors", "decoder.up_blocks.0.resnets.1.conv2.bias", "missing"])

    p = os.path.join(tmp, "missing_ldm.safetensors")
    d = V.to_ldm(dict(sd), 2, prefix="first_stage_model.")
    del d["first_stage_model.decoder.mid.attn_1.proj_out.weight"]
    V.write_safetensors(p, d)
    expect_fail("missing tensor (ldm)", ["--vae", p, "--z", zp, "--out", out],
                ["first_stage_model.decoder.mid.attn_1.proj_out.weight", "missing"])

    p = os.path.join(tmp, "shape.safetensors")
    d = dict(sd)
    d["decoder.mid_block.resnets.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    V.write_safetensors(p, d)
    expect_fail("wrong shape", ["--vae", p, "--z", zp, "--out", out],
                ["decoder.mid_block.resnets.0.conv2.weight", "[64,64,1,1]", "[64,64,3,3]"])

    p = os.path.join(tmp, "good.safetensors")
    V.write_safetensors(p, sd)
    z3 = os.path.join(tmp, "z3.npy")
    np.save(z3, z[:, :3])
    expect_fail("z channel mismatch", ["--vae", p, "--z", z3, "--out", out], ["z3.npy", "4"])
    z64 = os.path.join(tmp, "z64.npy")
    np.save(z64, z.astype(np.float64))
    expect_fail("float64 z", ["--vae", p, "--z", z64, "--out", out], ["z64.npy"])
    z2d = os.path.join(tmp, "z2d.npy")
    np.save(z2d, z[0, 0])
    expect_fail("2-D z", ["--vae", p, "--z", z2d, "--out", out], ["z2d.npy"])

    p = os.path.join(tmp, "enc_only.safetensors")
    V.write_safetensors(p, encoder_junk(4))
    expect_fail("no decoder tensors", ["--vae", p, "--z", zp, "--out", out],
                ["enc_only.safetensors", "not a VAE decoder file"])

    p = os.path.join(tmp, "upattn.safetensors")
    d = V.to_ldm(dict(sd), 2)
    d["decoder.up.1.attn.0.norm.weight"] = torch.ones(64)
    V.write_safetensors(p, d)
    expect_fail("unsupported up-block attention", ["--vae", p, "--z", zp, "--out", out],
                ["decoder.up.1.attn.0.norm.weight", "unexpected"])

    expect_fail("no --vae", ["--z", zp, "--out", out], ["--vae"])
    expect_fail("no output", ["--vae", p, "--z", zp], ["--out"])
    expect_fail("missing z file", ["--vae", os.path.join(tmp, "good.safetensors"), "--z",
                                   os.path.join(tmp, "nope.npy"), "--out", out], ["nope.npy"],
                codes=(1, 2))


def full_sd_list(tmp):
    """Every scheme of the 140-tensor SD-VAE decoder list (plus encoder tensors) loads; a 4x4
    latent (32x32 image) decodes identically from all of them and matches the float32 reference."""
    torch.manual_seed(0)
    dec = V.Decoder(V.SD_CONFIG)  # torch default init: small values of the right shapes
    sd = dec.state_dict()
    n = sum(t.numel() for t in sd.values())
    check(len(sd) == 140 and n == 49490199, f"SD decoder tensor list: {len(sd)} tensors, {n} params")
    z = torch.randn(1, 4, 4, 4) * 0.18215
    zp = os.path.join(tmp, "sd_z.npy")
    np.save(zp, z.numpy())
    with torch.no_grad():
        ref = dec.double().decode(z.double()).numpy()
    rms = float(np.sqrt(np.mean(ref ** 2)))
    first = None
    for sname, tensors in schemes(sd, 4).items():
        vp = os.path.join(tmp, f"sd_{sname}.safetensors")
        V.write_safetensors(vp, with_junk(sname, tensors, 4))
        op = os.path.join(tmp, f"sd_{sname}.npy")
        rc, out = run(["--vae", vp, "--z", zp, "--out", op])
        os.remove(vp)
        if rc != 0:
            check(False, f"SD list [{sname}]: exit {rc}: {out.strip()[:300]}")
            continue
        img = np.load(op)
        err = float(np.max(np.abs(img - ref))) if img.shape == ref.shape else float("inf")
        check(err <= REL_TOL * rms, f"SD list [{sname}]: {img.shape}, max|diff| {err:.3g} <= "
                                    f"{REL_TOL:g} x RMS {rms:.3g}")
        if first is None:
            first = img
        else:
            check(np.array_equal(first, img), f"SD list [{sname}]: identical to diffusers naming")


def batch_invariance(tmp):
    """Small images of a batch are decoded side by side, one per thread, each by its own copy of
    the decoder (src/vae/vae.c image_workers): every image must have the bits it has when decoded
    alone on one thread, for 2 and 3 threads (the shipped VAE and a random one with mid attention
    and widths that are not multiples of 32)."""
    cfg = V.VAEConfig(ch=24, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, out_ch=3, norm_groups=8)
    dec = V.randomize_(V.Decoder(cfg), seed=4)
    vr = os.path.join(tmp, "bi_vae.safetensors")
    V.write_safetensors(vr, dec.state_dict(), V.vae_metadata(cfg))
    shipped = os.path.join(SRC, "assets", "vae-fmnist.safetensors")
    g = torch.Generator().manual_seed(9)
    for name, vp in (("shipped Fashion-MNIST VAE", shipped), ("random VAE", vr)):
        if not os.path.exists(vp):
            check(False, f"batch invariance: {vp} exists")
            continue
        z = (torch.randn(5, 4, 8, 8, generator=g) * 0.5).numpy()
        zp, z1p = os.path.join(tmp, "bi_z.npy"), os.path.join(tmp, "bi_z1.npy")
        np.save(zp, z)
        np.save(z1p, z[3:4])
        alone = os.path.join(tmp, "bi_alone.npy")
        p = subprocess.run([TOOL, "-q", "--threads", "1", "--vae", vp, "--z", z1p, "--out", alone],
                           capture_output=True, text=True)
        check(p.returncode == 0, f"batch invariance [{name}]: image 3 alone, 1 thread: exit "
              f"{p.returncode} {p.stderr.strip()[:200]}")
        for t in (2, 3):
            op = os.path.join(tmp, f"bi_t{t}.npy")
            p = subprocess.run([TOOL, "-q", "--threads", str(t), "--vae", vp, "--z", zp, "--out", op],
                               capture_output=True, text=True)
            ok = p.returncode == 0 and os.path.exists(alone)
            same = ok and np.load(op)[3:4].tobytes() == np.load(alone).tobytes()
            check(same, f"batch invariance [{name}]: image 3 of 5 at --threads {t} == alone at "
                  f"--threads 1, bitwise (exit {p.returncode})")


def main():
    if not os.path.exists(TOOL):
        print("missing", TOOL)
        sys.exit(1)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        # Config A: ldm-compatible tiny config, metadata gives 8 groups and scale 0.5.
        a = V.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, out_ch=3,
                        norm_groups=8)
        dec, z, ref = parity(tmp, "A", a, B=2, h=8, w=8, metadata=V.vae_metadata(a, 0.5), scale=0.5)
        png_check(tmp, "A", z, ref)
        # Config A without metadata: 32 groups inferred, default scale 0.18215.
        a32 = V.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, out_ch=3)
        parity(tmp, "A32", a32, B=1, h=6, w=7, metadata=None, scale=V.SD_SCALE)
        # Config B: gray output, 3 levels, 2 resnets + 1 per level, non-square latent, z 3,
        # groups inferred (16 = largest divisor <= 32 of widths 16/32/64), no metadata.
        b = V.VAEConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, out_ch=1)
        dec, z, ref = parity(tmp, "B", b, B=3, h=5, w=6, metadata=None, scale=V.SD_SCALE)
        png_check(tmp, "B", z, ref)
        bad_inputs(tmp)
        full_sd_list(tmp)
        batch_invariance(tmp)
    if failures:
        print(f"{len(failures)} failure(s)")
        sys.exit(1)
    print("all VAE parity checks passed")


if __name__ == "__main__":
    main()
