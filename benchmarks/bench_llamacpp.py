"""mtplx against llama.cpp on the same weights, same machine: decode ms/token, r(k), MTP tok/s.

    python benchmarks/bench_llamacpp.py                          # default model + 0.8B dense + MoE shapes
    python benchmarks/bench_llamacpp.py --models default --dtypes f32 --threads 1
    python benchmarks/bench_llamacpp.py --json out.json

What it does (not part of the test run; the first run builds llama.cpp, ~5-15 min on 2 cores):
1. llama.cpp from the source vendored in the pinned `llama-cpp-python` sdist (pip download),
   built with cmake into --cache (only `llama-bench`, GGML_NATIVE);
2. each checkpoint (the embedded default model; random Qwen3.5-0.8B-shaped dense and
   Qwen3.5-MoE-shaped (64 experts top-8) ones with the default model's 4104-row vocabulary) converted to GGUF
   by llama.cpp's own converter (told that our byte-level BPE splits like GPT-2), in F32 / BF16;
3. llama.cpp: `llama-bench` text generation (-n) gives ms/token; prompt batches of k tokens
   (-p k) give r(k) = time of one k-token forward / time of one decode step;
4. mtplx (torch backend, the default exact-path kernel): depth-0 ms/token from timed decode
   steps, r(k) from timed k-row verify forwards, and for checkpoints with a trained head the
   best MTP depth's tok/s;
5. the machine's streaming-read bandwidth (a large array summed) as the roofline: the weight
   bytes read per token / ms per token.
Runs alternate between the two runtimes round by round (--reps rounds per configuration: llama.cpp,
then mtplx), each figure the median over rounds; nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
VOCAB = 4104  # the default model's tokenizer (4102 ids, padded rows), copied into the random checkpoints
CACHE = Path(os.environ.get("MTPLX_LLAMACPP_CACHE", Path.home() / ".cache" / "mtplx" / "llama.cpp-0.3.36"))


# ---- llama.cpp: build, convert, run ------------------------------------------------------------

def llama_source(cache: Path) -> Path:
    src = cache / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading {SDIST} (sdist) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                    "-d", str(cache), "-q"], check=True)
    archive = next(cache.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tf:
        top = tf.getnames()[0].split("/")[0]
        members = [m for m in tf.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
        tf.extractall(cache / "x", members=members)
    (cache / "x" / top / "vendor" / "llama.cpp").rename(src)
    return src


def llama_bench_binary(cache: Path, jobs: int) -> Path:
    src = llama_source(cache)
    exe = src / "build" / "bin" / "llama-bench"
    if exe.is_file():
        return exe
    print(f"building llama-bench in {src / 'build'} (cmake, -j{jobs}) ...", flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(src / "build"), "-j", str(jobs), "--target", "llama-bench"], check=True)
    return exe


_CONVERT = """
import sys
sys.path.insert(0, {src!r}); sys.path.insert(0, {src!r} + "/gguf-py")
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # our byte-level BPE splits as GPT-2's
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", {ckpt!r}, "--outtype", {outtype!r}, "--outfile", {out!r}]
convert_hf_to_gguf.main()
"""


def to_gguf(cache: Path, ckpt: Path, outtype: str, out: Path) -> Path:
    if out.is_file():
        return out
    src = llama_source(cache)
    code = _CONVERT.format(src=str(src), ckpt=str(ckpt), outtype=outtype, out=str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp's converter failed on {ckpt} ({outtype}):\n{r.stderr[-3000:]}")
    return out


def llama_bench(exe: Path, gguf: Path, threads: int, n_gen: int, batch_sizes: list[int], reps: int) -> dict:
    """-> {"ms_per_token": decode, "r": {k: r(k)}} from llama-bench's JSON output."""
    args = [str(exe), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json",
            "-p", ",".join(map(str, batch_sizes)), "-n", str(n_gen), "-ngl", "0"]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama-bench failed: {r.stderr[-2000:]}")
    rows = json.loads(r.stdout)
    tg = next(x for x in rows if x["n_gen"] > 0)
    ms = 1000.0 / tg["avg_ts"]
    ratios = {}
    for x in rows:
        if x["n_prompt"] > 0:
            ratios[x["n_prompt"]] = (1000.0 * x["n_prompt"] / x["avg_ts"]) / ms
    return {"ms_per_token": ms, "r": ratios}


# ---- mtplx ---------------------------------------------------------------------------------------

def mtplx_costs(model, n_gen: int, batch_sizes: list[int], reps: int) -> dict:
    """Depth-0 ms/token (timed decode steps after a short prompt) and r(k) (k-row verify forwards
    at the same position, rolled back each time)."""
    import torch

    s = model.new_session()
    ids = [(13 * i + 5) % 4000 + 10 for i in range(32)]
    s.prefill(ids)
    s.last = ids[-1]
    with torch.inference_mode():
        for _ in range(4):
            s.verify([])
            s.commit(0, ids[0])
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for i in range(n_gen):
                s.verify([])
                s.commit(0, ids[i % 32])
            best = min(best, (time.perf_counter() - t0) / n_gen)
        ratios = {}
        for k in batch_sizes:
            times = []
            for _ in range(reps * 4):
                t0 = time.perf_counter()
                s.verify(ids[:k - 1])
                times.append(time.perf_counter() - t0)
                s.commit(0, ids[0])
            ratios[k] = min(times) / best
    return {"ms_per_token": best * 1000, "r": ratios}


def mtplx_mtp(model, depths: list[int], n_gen: int) -> dict:
    import mtplx
    from mtplx.decoding.params import SamplingParams

    prompt = "import json\n\ndef load_settings(path):\n"
    p = SamplingParams(temperature=0.0, max_tokens=n_gen, ignore_eos=True)
    mtplx.generate(model, prompt, SamplingParams(max_tokens=8, ignore_eos=True), depth=1)
    out = {}
    for d in depths:
        r = mtplx.generate(model, prompt, p, depth=d)
        out[d] = r.stats.generation_tokens / r.stats.generation_time_s
    return out


# ---- checkpoints and the roofline ---------------------------------------------------------------

def checkpoints(names: list[str], dtype: str, work: Path) -> dict[str, Path]:
    from mtplx.api import DEFAULT_MODEL_DIR
    from mtplx.checkpoint.synthetic import preset_config, write_synthetic_checkpoint

    shapes = {
        "dense08b": ("qwen3.5-0.8b", dict(hidden_size=1024, num_hidden_layers=24, vocab_size=VOCAB,
                                          num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                                          intermediate_size=3584, linear_num_key_heads=16, linear_num_value_heads=16,
                                          linear_key_head_dim=128, linear_value_head_dim=128)),
        "moe": ("qwen3.5-35b-a3b", dict(hidden_size=1024, num_hidden_layers=12, vocab_size=VOCAB,
                                        num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                                        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
                                        linear_value_head_dim=128, num_experts=64, num_experts_per_tok=8,
                                        moe_intermediate_size=256, shared_expert_intermediate_size=256)),
    }
    out = {}
    for name in names:
        if name == "default":
            out[name] = DEFAULT_MODEL_DIR
            continue
        folder = work / f"{name}-{dtype}"
        if not (folder / "config.json").is_file():
            preset, over = shapes[name]
            print(f"writing a random {name} checkpoint ({dtype}) ...", flush=True)
            write_synthetic_checkpoint(folder, preset_config(preset, **over), seed=0,
                                       dtype="float32" if dtype == "f32" else "bfloat16")
            for f in ("tokenizer.json", "tokenizer_config.json"):  # a real BPE (merges) for the converter
                shutil.copy2(DEFAULT_MODEL_DIR / f, folder / f)
        out[name] = folder
    return out


def read_bandwidth_gbs(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(256 << 20, dtype=torch.uint8).view(torch.float32)  # 256 MB, well past the caches
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(model) -> int:
    import torch

    return sum(p.numel() * p.element_size() for p in model.model.parameters() if isinstance(p, torch.Tensor))


# ---- main ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default,dense08b,moe")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--k", default="2,3,4,5", help="verify / batch row counts for r(k)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds (llama.cpp, then mtplx) per configuration")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import mtplx

    exe = llama_bench_binary(args.cache, args.jobs)
    ks = [int(k) for k in args.k.split(",")]
    work = Path(tempfile.gettempdir()) / "mtplx_bench_llamacpp"
    work.mkdir(exist_ok=True)
    rows = []
    for dtype in args.dtypes.split(","):
        for name, ckpt in checkpoints(args.models.split(","), dtype, work).items():
            gguf = to_gguf(args.cache, ckpt, dtype, work / f"{name}-{dtype}.gguf")
            model = mtplx.load(str(ckpt), backend="torch", dtype="float32" if dtype == "f32" else "bfloat16")
            for th in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(th)
                row = {"model": name, "dtype": dtype, "threads": th, "kernel": model.model.kernel,
                       **interleaved(model, exe, gguf, th, args.n_gen, ks, args.reps, mtp=model.has_mtp and name == "default"),
                       "weights_mb": round(weight_bytes(model) / 2**20, 1)}
                row["mtplx_gbs"] = round(weight_bytes(model) / row["mtplx_ms"] / 1e6, 1)
                rows.append(row)
                print(_line(row), flush=True)
    bw = {th: round(read_bandwidth_gbs(int(th)), 1) for th in args.threads.split(",")}
    print(f"streaming-read bandwidth (roofline): " + ", ".join(f"{t} thread(s) {v} GB/s" for t, v in bw.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "read_bandwidth_gbs": bw}, indent=2))


def interleaved(model, exe: Path, gguf: Path, threads: int, n_gen: int, ks: list[int], rounds: int, mtp: bool) -> dict:
    """`rounds` rounds of llama.cpp then mtplx, one right after the other, so a shared machine's slow
    stretches hit both; each figure is the median over rounds, each ratio the median of the
    rounds' own ratios."""
    from statistics import median

    per_round = []
    for _ in range(rounds):
        theirs = llama_bench(exe, gguf, threads, n_gen, ks, 1)
        ours = mtplx_costs(model, n_gen, ks, 2)
        r = {"theirs": theirs, "ours": ours}
        if mtp:
            r["tps"] = mtplx_mtp(model, [0, 1, 2, 3, 4], n_gen * 2)
        per_round.append(r)
    med = lambda f: median(f(r) for r in per_round)  # noqa: E731
    out = {"mtplx_ms": round(med(lambda r: r["ours"]["ms_per_token"]), 3),
           "llama_ms": round(med(lambda r: r["theirs"]["ms_per_token"]), 3),
           "ratio": round(med(lambda r: r["ours"]["ms_per_token"] / r["theirs"]["ms_per_token"]), 3),
           "mtplx_r": {k: round(med(lambda r: r["ours"]["r"][k]), 2) for k in ks},
           "llama_r": {k: round(med(lambda r: r["theirs"]["r"][k]), 2) for k in ks},
           "rounds": rounds}
    if mtp:
        depths = per_round[0]["tps"].keys()
        tps = {d: med(lambda r: r["tps"][d]) for d in depths}
        best = max((d for d in tps if d > 0), key=tps.get)
        vs = med(lambda r: r["tps"][best] * r["theirs"]["ms_per_token"] / 1000)
        out["mtplx_mtp_tok_s"] = {d: round(v, 1) for d, v in tps.items()}
        out["mtplx_best_mtp"] = {"depth": best, "tok_s": round(tps[best], 1), "vs_llama_plain": round(vs, 3)}
    return out


def _line(r: dict) -> str:
    rk = lambda d: "/".join(f"{v:.2f}" for v in d.values())  # noqa: E731
    s = (f"{r['model']:>9} {r['dtype']:>4} t{r['threads']}: mtplx {r['mtplx_ms']:8.3f} ms ({r['mtplx_gbs']:5.1f} GB/s)"
         f"  llama.cpp {r['llama_ms']:8.3f} ms  ratio {r['ratio']:.2f}x  r(k) mtplx {rk(r['mtplx_r'])}"
         f"  llama.cpp {rk(r['llama_r'])}")
    if "mtplx_best_mtp" in r:
        b = r["mtplx_best_mtp"]
        s += (f"  | mtplx generate: depth 0 {r['mtplx_mtp_tok_s'][0]} tok/s, best MTP depth {b['depth']} {b['tok_s']} tok/s"
              f" = {b['vs_llama_plain']:.2f}x llama.cpp plain")
    return s


if __name__ == "__main__":
    main()
