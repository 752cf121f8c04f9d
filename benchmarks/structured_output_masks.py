"""Grammar libraries for structured output, measured on the default model's tokenizer (issue 22).

For xgrammar and llguidance, on SmolLM2-135M-Instruct's tokenizer (49152 tokens) and the schema
suite of tests/support/json_schemas.py:

- import cost, and whether importing pulls torch / transformers into the process (the engine's
  process deliberately imports neither: tests/engine_logic/test_tokenizer.py);
- tokenizer set-up time;
- compile time per schema, cold (nothing cached) and cached (the library's or our cache);
- per-token mask fill cost (mean, p50, p99) while generating under each schema: seeded random
  walks (tests/support/json_schemas.random_walk: each step picks one allowed token), the mask
  filled before every token;
- JSON-schema coverage: per feature, "enforced" (compiles and 20 random walks all validate with
  `jsonschema`), "refused" (compile error), "IGNORED" (compiles, but a walk violates the
  feature), and how many walks were not valid JSON at all.

    python benchmarks/structured_output_masks.py [--walks 20] [--json OUT]

Runs on CPU only; each library is measured in its own subprocess so import costs are honest.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.json_schemas import COVERAGE_PROBES, SCHEMAS, WalkVocab, random_walk  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Llguidance:
    name = "llguidance"

    def __init__(self, model_dir: pathlib.Path, eos: list[int]) -> None:
        t0 = time.perf_counter()
        import llguidance  # noqa: F401

        self.import_s = time.perf_counter() - t0
        self.heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        self.version = importlib.metadata.version("llguidance")
        t0 = time.perf_counter()
        from shardline.engine.structured_output import GrammarCompiler

        self.compiler = GrammarCompiler(
            (model_dir / "tokenizer.json").read_text(), eos_token_ids=eos
        )
        self.tokenizer_s = time.perf_counter() - t0
        self.vocab = self.compiler.vocab_size

    def compile_cold(self, schema: dict[str, Any]) -> Any:
        from shardline.engine.structured_output import StructuredOutputSpec

        self.compiler.clear_cache()
        return self.compiler.matcher(StructuredOutputSpec.json(schema))

    def compile_cached(self, schema: dict[str, Any]) -> Any:
        from shardline.engine.structured_output import StructuredOutputSpec

        return self.compiler.matcher(StructuredOutputSpec.json(schema))

    @staticmethod
    def fill(matcher: Any, out: np.ndarray) -> None:
        matcher.fill_bitmask(out)

    @staticmethod
    def accept(matcher: Any, token: int) -> bool:
        return bool(matcher.accept([token]))


class _Xgrammar:
    name = "xgrammar"

    def __init__(self, model_dir: pathlib.Path, eos: list[int]) -> None:
        t0 = time.perf_counter()
        import xgrammar

        self.import_s = time.perf_counter() - t0
        self.heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        self.version = importlib.metadata.version("xgrammar")
        self.xgr = xgrammar
        t0 = time.perf_counter()
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(model_dir))
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            hf, vocab_size=len(hf), stop_token_ids=eos
        )
        self.compiler = xgrammar.GrammarCompiler(self.info)
        self.tokenizer_s = time.perf_counter() - t0
        self.vocab = len(hf)

    def _compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, strict_mode=True
        )

    def compile_cold(self, schema: dict[str, Any]) -> Any:
        self.compiler.clear_cache()
        return self.xgr.GrammarMatcher(self._compile(schema))

    def compile_cached(self, schema: dict[str, Any]) -> Any:
        return self.xgr.GrammarMatcher(self._compile(schema))

    @staticmethod
    def fill(matcher: Any, out: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(out.reshape(1, -1))

    @staticmethod
    def accept(matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


def measure(library: str, walks: int) -> dict[str, Any]:
    model_dir = pathlib.Path(MODEL_DIR)
    eos = [2]  # SmolLM2-Instruct's <|im_end|>
    lib: Any = (_Llguidance if library == "llguidance" else _Xgrammar)(model_dir, eos)
    heavy = lib.heavy
    import jsonschema
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = WalkVocab([tok.decode([i]) for i in range(lib.vocab)])
    walks_per_schema = max(1, walks // 4)

    compile_cold, compile_cached, fills, lengths = {}, {}, [], []

    def timed_fill(matcher: Any, out: np.ndarray) -> None:
        t0 = time.perf_counter()
        lib.fill(matcher, out)
        fills.append(time.perf_counter() - t0)

    rng = np.random.default_rng(1234)
    for name, schema in SCHEMAS:
        t0 = time.perf_counter()
        lib.compile_cold(schema)
        compile_cold[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lib.compile_cached(schema)
        compile_cached[name] = time.perf_counter() - t0
        for _ in range(walks_per_schema):
            matcher = lib.compile_cached(schema)
            lengths.append(
                len(
                    random_walk(
                        lambda out, m=matcher: timed_fill(m, out),
                        lambda t, m=matcher: lib.accept(m, t),
                        eos,
                        vocab,
                        rng,
                    )
                )
            )

    coverage: dict[str, str] = {}
    for feature, schema in COVERAGE_PROBES.items():
        try:
            lib.compile_cold(schema)
        except Exception as exc:  # the library's own error type
            coverage[feature] = f"refused ({str(exc).splitlines()[0][:80]})"
            continue
        violated = broken = 0
        rng = np.random.default_rng(0)
        for _ in range(walks):
            matcher = lib.compile_cached(schema)
            tokens = random_walk(
                lambda out, m=matcher: lib.fill(m, out),
                lambda t, m=matcher: lib.accept(m, t),
                eos,
                vocab,
                rng,
            )
            try:
                value = json.loads(tok.decode([t for t in tokens if t not in eos]))
            except ValueError:
                broken += 1
                continue
            violated += not jsonschema.Draft202012Validator(schema).is_valid(value)
        verdicts = [f"IGNORED ({violated}/{walks} walks violate it)"] if violated else []
        verdicts += [f"{broken}/{walks} walks not valid JSON"] if broken else []
        coverage[feature] = "; ".join(verdicts) or "enforced"

    return {
        "library": library,
        "version": lib.version,
        "import_s": lib.import_s,
        "imports_torch_or_transformers": heavy,
        "tokenizer_setup_s": lib.tokenizer_s,
        "compile_cold_ms": {k: v * 1e3 for k, v in compile_cold.items()},
        "compile_cached_ms": {k: v * 1e3 for k, v in compile_cached.items()},
        "fill_us_mean": statistics.fmean(fills) * 1e6 if fills else None,
        "fill_us_p50": _pct(fills, 0.5) * 1e6 if fills else None,
        "fill_us_p99": _pct(fills, 0.99) * 1e6 if fills else None,
        "fills": len(fills),
        "walk_tokens_mean": statistics.fmean(lengths),
        "coverage": coverage,
    }


MODEL_DIR = ""


def _summary(r: dict[str, Any]) -> str:
    cold = list(r["compile_cold_ms"].values())
    cached = list(r["compile_cached_ms"].values())
    lines = [
        f"## {r['library']} {r['version']}",
        f"import {r['import_s']:.2f} s (pulls in: {r['imports_torch_or_transformers'] or 'nothing heavy'}), "
        f"tokenizer set-up {r['tokenizer_setup_s']:.2f} s",
        f"compile cold: mean {statistics.fmean(cold):.2f} ms, max {max(cold):.2f} ms "
        f"({max(r['compile_cold_ms'], key=r['compile_cold_ms'].get)}); "
        f"cached: mean {statistics.fmean(cached):.3f} ms, max {max(cached):.3f} ms",
        f"mask fill over {r['fills']} tokens: mean {r['fill_us_mean']:.1f} us, "
        f"p50 {r['fill_us_p50']:.1f} us, p99 {r['fill_us_p99']:.1f} us",
        "coverage:",
        *(f"  {feature:30s} {verdict}" for feature, verdict in r["coverage"].items()),
    ]
    return "\n".join(lines)


def main() -> None:
    global MODEL_DIR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--walks", type=int, default=20)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--library", choices=["llguidance", "xgrammar"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.library:  # child: one library in a fresh process
        MODEL_DIR = args.model_dir
        print(json.dumps(measure(args.library, args.walks)))
        return
    from shardline.model.fetch import fetch_default_model

    model_dir = fetch_default_model()
    results = []
    for library in ("llguidance", "xgrammar"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--library",
                library,
                "--walks",
                str(args.walks),
                "--model-dir",
                str(model_dir),
            ],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for r in results:
        print(_summary(r))
        print()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
