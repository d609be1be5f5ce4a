"""The server as a shared service: an API key on every route, adapter management off unless asked for and only
from allowed folders, names checked, no silent overwrite, a removed folder adapter really gone, and one bad
request (an out-of-range seed, an adapter for another base) failing alone."""

from __future__ import annotations

import shutil

import pytest
from hub_modules import make_modules, tokenizer
from tiny_models import tiny_llama

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from loraloom.models import load_base  # noqa: E402
from loraloom.serve import AdapterCache, Engine  # noqa: E402
from loraloom.serve.app import Access, create_app  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    model = tiny_llama(seed=3)
    model.save_pretrained(root / "base")
    tokenizer(add_eos=False).save_pretrained(root / "base")
    make_modules(model, root / "adapters", 2, r=4, targets=["q_proj", "v_proj"], scale=0.4)
    make_modules(model, root / "extra", 1, r=4, targets=["q_proj", "v_proj"], scale=0.4, prefix="x")
    make_modules(model, root / "outside", 1, r=4, targets=["q_proj", "v_proj"], scale=0.4, prefix="o")
    wider = tiny_llama(seed=3)  # an adapter made for another base: its shapes do not fit this one
    wider.config.hidden_size = 48
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(wider.config)
    make_modules(other, root / "adapters", 1, r=4, targets=["q_proj"], scale=0.4, prefix="foreign")
    return root


def client(world, **access) -> TestClient:
    model, tok = load_base(str(world / "base"), "causal")
    cache = AdapterCache(world / "adapters", limit_mib=64)
    access.setdefault("roots", (str(world / "adapters"), str(world / "extra")))
    return TestClient(create_app(Engine(model, tok, max_batch=8), cache, Access(**access)))


def completion(c: TestClient, headers=None, **body):
    return c.post("/v1/completions", json={"model": "base", "prompt": "copy: ant", "max_tokens": 2, **body},
                  headers=headers or {})  # fmt: skip


def test_every_route_wants_the_key(world):
    with client(world, api_key=KEY) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert completion(c).status_code == 401 and completion(c).json()["error"]["code"] == "invalid_api_key"
        ok = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert completion(c, headers=ok).status_code == 200


def test_adapter_management_is_off_unless_asked_for(world):
    with client(world) as c:
        assert c.post("/v1/adapters", json={"name": "x", "source": str(world / "extra" / "x00")}).status_code == 403
        assert c.delete("/v1/adapters/m00").status_code == 403


def test_posted_adapters_come_only_from_allowed_folders_and_never_overwrite_silently(world):
    with client(world, manage=True) as c:
        outside = c.post("/v1/adapters", json={"name": "o", "source": str(world / "outside" / "o00")})
        assert outside.status_code == 403 and str(world) not in outside.text  # no path echoed
        link = world / "extra" / "sneaky"
        if not link.exists():
            link.symlink_to(world / "outside" / "o00")  # a link inside an allowed folder to a folder outside
        assert c.post("/v1/adapters", json={"name": "s", "source": str(link)}).status_code == 403
        assert c.post("/v1/adapters", json={"name": "h", "source": "someone/adapter"}).status_code == 403  # no hub
        assert c.post("/v1/adapters", json={"name": "../x", "source": str(world / "extra" / "x00")}).status_code == 400
        assert c.post("/v1/adapters", json={"name": "x", "source": str(world / "extra" / "x00")}).status_code == 200
        again = {"name": "m00", "source": str(world / "extra" / "x00")}
        assert c.post("/v1/adapters", json=again).status_code == 409
        assert c.post("/v1/adapters", json={**again, "replace": True}).status_code == 200


def test_a_removed_folder_adapter_is_no_longer_served(world, tmp_path):
    adapters = tmp_path / "adapters"
    shutil.copytree(world / "adapters", adapters)
    model, tok = load_base(str(world / "base"), "causal")
    app = create_app(Engine(model, tok), AdapterCache(adapters), Access(manage=True, roots=(str(adapters),)))
    with TestClient(app) as c:
        assert completion(c, model="m01").status_code == 200
        assert c.delete("/v1/adapters/m01").status_code == 200
        assert completion(c, model="m01").status_code == 404
        assert "m01" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert (adapters / "m01").is_dir()  # the files stay: only the serving stops


def test_one_bad_request_fails_alone(world):
    with client(world) as c:
        huge_seed = completion(c, seed=2**70, temperature=1.0)
        assert huge_seed.status_code == 400 and "seed" in huge_seed.json()["error"]["message"]
        foreign = completion(c, model="foreign00")
        assert foreign.status_code == 500 and "foreign00" in foreign.json()["error"]["message"]
        assert completion(c, model="m00").status_code == 200 and completion(c).status_code == 200


def test_a_body_over_the_limit_is_refused_before_it_is_read(world):
    with client(world, max_body_bytes=1000) as c:
        big = c.post("/v1/completions", json={"model": "base", "prompt": "ant " * 1000, "max_tokens": 1})
        assert big.status_code == 413
        assert completion(c).status_code == 200


def test_health_model_cards_strict_types_and_unsupported_fields(world):
    with client(world) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/v1/models/m00").json()["parent"] == "base" and c.get("/v1/models/base").json()["parent"] is None
        assert c.get("/v1/models/nope").status_code == 404
        loose = completion(c, max_tokens="3")  # a string where a number goes
        assert loose.status_code == 400 and "max_tokens" in loose.json()["error"]["message"]
        assert completion(c, stream="yes").status_code == 400
        for field, value in [("suffix", "end"), ("best_of", 3), ("tools", [{"type": "function"}]), ("nope", 1)]:
            unsupported = completion(c, **{field: value})  # not implemented: refused by name, never dropped
            assert unsupported.status_code == 400 and field in unsupported.json()["error"]["message"], field
        newer = completion(c, max_tokens=None, max_completion_tokens=2, temperature=0)
        assert newer.status_code == 200 and newer.json()["usage"]["completion_tokens"] <= 2


def test_every_eos_id_of_generation_config_stops_generation(world):
    model, tok = load_base(str(world / "base"), "causal")
    model.generation_config.eos_token_id = [tok.eos_token_id or 0, 7, 9]  # a chat model's several end ids
    assert {7, 9} <= Engine(model, tok).eos_ids
