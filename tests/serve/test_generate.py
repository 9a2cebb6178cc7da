"""The adapter server's token loop (``ChatModel.generate``) against transformers + peft's own
``generate`` on the tiny demo model: greedy answers are the same tokens, with the adapter and
with it switched off; one chunk per token whose text is the whole answer decoded."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from remoteops.trainer import serve_adapter  # noqa: E402
from tests.serve.models import make_adapter  # noqa: E402

PROMPT = [{"role": "user", "content": "写一段关于学习的简短说明。Explain it in a few lines."}]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from remoteops.trainer.demo_model import build_demo_model

    work = tmp_path_factory.mktemp("generate")
    base = build_demo_model(work / "demo-model", seed=0)
    adapter = make_adapter(base, work / "adapter")
    return serve_adapter.ChatModel(base, adapter, "tiny")


def served(chat, monkeypatch, ids, **kw) -> tuple[list[int], list[str], dict]:
    """The server's tokens (as ``_pick`` chose them), its chunks and its stats."""
    picked: list[int] = []
    pick = serve_adapter._pick

    def recording(*args):
        token = pick(*args)
        picked.append(int(token))
        return token

    monkeypatch.setattr(serve_adapter, "_pick", recording)
    stats = {"tokens": 0}
    pieces = list(chat.generate(ids, temperature=0.0, top_p=1.0, stats=stats, **kw))
    return [t for t in picked if t not in chat.eos], pieces, stats


def plain(chat, ids, max_new: int, min_new: int, use_base: bool) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        if use_base:
            with chat.model.disable_adapter():
                out = chat.model.generate(x, max_new_tokens=max_new, min_new_tokens=min_new,
                                          do_sample=False)
        else:
            out = chat.model.generate(x, max_new_tokens=max_new, min_new_tokens=min_new,
                                      do_sample=False)
    new = out[0, len(ids):].tolist()
    return [t for t in new if t not in chat.eos]


@pytest.mark.parametrize("use_base", [False, True])
@pytest.mark.parametrize("min_tokens", [0, 40])
def test_greedy_matches_plain_generate(chat, monkeypatch, use_base, min_tokens):
    ids = chat.prompt_ids(PROMPT)
    tokens, pieces, stats = served(chat, monkeypatch, ids, max_tokens=40, min_tokens=min_tokens,
                                   use_base=use_base)
    assert tokens == plain(chat, ids, 40, min_tokens, use_base)
    assert len(pieces) == len(tokens) == stats["tokens"]
    if min_tokens:
        assert len(tokens) == 40
    text = chat.tokenizer.decode(tokens, skip_special_tokens=True)
    assert "".join(pieces) == text


def test_adapter_changes_the_answer(chat, monkeypatch):
    ids = chat.prompt_ids(PROMPT)
    with_adapter = served(chat, monkeypatch, ids, max_tokens=20, min_tokens=20)[0]
    without = served(chat, monkeypatch, ids, max_tokens=20, min_tokens=20, use_base=True)[0]
    assert with_adapter != without


@pytest.fixture
def worked(chat):
    """``MainThreadModel`` over the tiny model, its working thread started (as ``serve`` runs
    it in the main thread), and the threads that ran the model's forward."""
    import threading

    model = serve_adapter.MainThreadModel(chat)
    ran_in: list[str] = []
    hook = chat.lm.register_forward_pre_hook(
        lambda *_: ran_in.append(threading.current_thread().name))
    stop = threading.Event()
    worker = threading.Thread(target=model.work, args=(stop, 0.05), name="model")
    worker.start()
    yield model, ran_in
    stop.set()
    worker.join(10)
    hook.remove()
    assert not worker.is_alive()


def test_requests_from_other_threads_run_in_the_working_thread(chat, worked):
    import threading

    model, ran_in = worked
    ids = chat.prompt_ids(PROMPT)
    direct = list(chat.generate(ids, max_tokens=24, temperature=0.0, top_p=1.0, min_tokens=24))
    ran_in.clear()
    answers: dict[str, list[str]] = {}

    def ask(name: str) -> None:  # as an HTTP thread does
        answers[name] = list(model.generate(ids, max_tokens=24, temperature=0.0, top_p=1.0,
                                            min_tokens=24))

    askers = [threading.Thread(target=ask, args=(f"http-{i}",)) for i in range(3)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(60)
    assert answers == {f"http-{i}": direct for i in range(3)}
    assert len(ran_in) == 3 * 24 and set(ran_in) == {"model"}


def test_a_caller_that_stops_reading_stops_the_model(chat, worked):
    model, ran_in = worked
    ids = chat.prompt_ids(PROMPT)
    pieces = model.generate(ids, max_tokens=400, temperature=0.0, top_p=1.0, min_tokens=400)
    next(pieces), next(pieces)
    pieces.close()  # a client gone: the handler closes its generator
    after = list(model.generate(ids, max_tokens=5, temperature=0.0, top_p=1.0, min_tokens=5))
    assert len(after) == 5
    # the closed answer stopped after the token in hand: two read, some queued ahead of the
    # reader (how many depends on the scheduler: half the answer is a wide margin), not 400
    assert len(ran_in) < 200 + 5


def test_a_model_error_reaches_the_caller_and_the_next_request_is_served(chat, worked):
    model, _ = worked
    ids = chat.prompt_ids(PROMPT)
    with pytest.raises(TypeError):
        list(model.generate(ids, max_tokens="many", temperature=0.0, top_p=1.0))
    assert len(list(model.generate(ids, max_tokens=3, temperature=0.0, top_p=1.0,
                                   min_tokens=3))) == 3
