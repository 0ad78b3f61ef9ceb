"""scripts/soak_serving.py for a few seconds against a real server on an ephemeral localhost port (the
embedded Shakespeare model, a small cache so that requests also wait for pages and for the queue):
random request mixes and disconnects leave no pages behind, and a leak is reported as one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

import vishwam_jax as vj
from vishwam_jax.inference.engine_thread import EngineThread
from vishwam_jax.inference.openai_server import create_app, serve_in_thread
from vishwam_jax.inference.sampling import SAMPLING_MODES
from vishwam_jax.inference.serving import Engine, EngineConfig

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "soak_serving.py"


def load_script():
    spec = importlib.util.spec_from_file_location("soak_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_leaks_no_pages_and_a_leak_fails_it():
    soak = load_script()
    model = vj.load("gemma-shakespeare", dtype=np.float32)
    # 8 slots, 16 pages (a request takes 1-3): requests wait for pages and for the queue of 4.
    config = EngineConfig(num_slots=8, max_len=192, prefill_rows=4, chunk_buckets=(64,), num_pages=16, max_queue=4)
    engine = Engine(model, config, tokenizer=model.tokenizer)
    engine.warmup(SAMPLING_MODES)  # the soak's requests sample every way
    app = create_app(EngineThread(engine), tokenizer=model.tokenizer, model_name="s", drain_timeout_s=2.0)
    with serve_in_thread(app) as (url, _):
        args = soak.parser().parse_args(
            ["--url", url, "--minutes", "0.08", "--clients", "12", "--max-prompt-chars", "100"]
            + ["--max-output", "40", "--disconnect-share", "0.3", "--health-interval", "0.5", "--idle-timeout", "30"]
        )
        result = soak.run_soak(url, args)
        assert result["failures"] == [], result
        assert result["served"] > 0 and result["disconnects"] > 0 and result["health_checks"] > 3
        assert result["pages_used_at_end"] == 0 and result["max_pages_used"] > 0
        assert engine.pages_used == 0

        # The engine is idle: pages held by nobody must fail the next soak.
        engine.pages.reserve("leaked", 64)
        args.minutes, args.idle_timeout = 0.01, 1.0
        leaked = soak.run_soak(url, args)
        assert any("cache pages still in use" in f for f in leaked["failures"]), leaked
