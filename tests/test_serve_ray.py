"""``loraloom serve --ray-replicas 2`` on a local Ray: two replicas behind one endpoint answer the client.

Slow (Ray and two replicas start in 20-60 s on a shared 2-core machine): run with ``-m slow``.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hub_modules import make_modules, tokenizer
from tiny_models import tiny_llama

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
serve = pytest.importorskip("ray.serve")

from loraloom.adapters import load_adapter  # noqa: E402
from loraloom.evaluate import generate  # noqa: E402
from loraloom.models import load_base  # noqa: E402
from loraloom.serve.app import ServeOptions  # noqa: E402

pytestmark = pytest.mark.slow


def test_two_replicas_serve_adapters(tmp_path):
    model, tok = tiny_llama(seed=3), tokenizer(add_eos=False)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    make_modules(model, tmp_path / "adapters", 2, r=4, targets=["q_proj", "v_proj"], scale=0.4, seed=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from loraloom.serve.replicas import DEPLOYMENT, deploy

    options = ServeOptions(base=str(tmp_path / "base"), adapters=str(tmp_path / "adapters"), port=port, max_batch=8,
                           ray_replicas=2)  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        deploy(options, num_cpus=0.5)
        status = serve.status().applications[DEPLOYMENT].deployments[DEPLOYMENT]
        assert status.replica_states.get("RUNNING") == 2, status

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["base", "m00", "m01"]
        prompt = "copy: ant bee cat dog"

        def ask(name):
            return client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0).choices[0].text

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, ["m00", "m01"] * 8))
        for name in ("m00", "m01"):
            base, base_tok = load_base(str(tmp_path / "base"), "causal")
            want = generate(load_adapter(base, tmp_path / "adapters" / name), base_tok, [prompt], max_new_tokens=6)[0]
            assert {g for g, n in zip(got, ["m00", "m01"] * 8, strict=True) if n == name} == {want}
        stream = client.completions.create(model="m00", prompt=prompt, max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == got[0]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt=prompt)
    finally:
        serve.shutdown()
        ray.shutdown()
        time.sleep(0.5)
