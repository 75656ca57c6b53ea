"""`hyprof generate`: greedy tokens equal the reference's, and bad input is one line, exit 2."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid import generate as gen
from hybrid.gguf_model import load_model
from hybrid.tokenizer import Tokenizer
from hyprof.cli import main
from reference_deepseek2 import Deepseek2Reference


def reference_greedy(path, prompt: list[int], n: int) -> list[int]:
    ref = Deepseek2Reference(path)
    logits = ref.forward(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits = ref.forward([out[-1]])
    return out


@pytest.mark.parametrize("flags", [[], ["-mla", "1", "-fmoe", "1", "-t", "1"]], ids=["default", "mla-fmoe"])
def test_generated_ids_equal_reference_greedy(make_gguf, capsys, flags):
    path = make_gguf("tiny", "f32")
    assert main(["generate", "-m", str(path), "--prompt-ids", "1,5,77,300", "-n", "8", "--ids", *flags]) == 0
    out, err = capsys.readouterr()
    ids = [int(x) for x in out.strip().splitlines()[-1].split(",")]
    assert ids == reference_greedy(path, [1, 5, 77, 300], 8)
    assert "t/s" in err


def test_text_prompt_uses_the_vocabulary(tiny_gguf, capsys):
    tok = Tokenizer.from_gguf(load_model(tiny_gguf))
    text = "the cat sat on the mat"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and len(ids) < len(text)           # merges applied
    assert tok.decode(ids) == text
    assert main(["generate", "-m", str(tiny_gguf), "--prompt", text, "-n", "4", "--ids"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(text) and len(out[-1].split(",")) == 4


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids", "1,2,512"], "token id 512 out of range"),
    (["--prompt-ids", "1,-3"], "token id -3 out of range"),
    (["--prompt-ids", ",".join(["1"] * 20), "-c", "16"], "longer than the context of 16"),
    (["--prompt-ids", "1,2,3", "-n", "20", "-c", "16"], "exceed the context of 16"),
    (["--prompt-ids", "1,2", "-n", "0"], "-n 0"),
])
def test_bad_input_is_one_line_exit_2(tiny_gguf, capsys, args, message):
    assert main(["generate", "-m", str(tiny_gguf), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_model_too_big_for_ram_is_refused_before_loading(tiny_gguf, capsys, monkeypatch):
    monkeypatch.setattr(gen, "machine_ram_bytes", lambda: 1000)
    monkeypatch.setattr("hybrid.model.Model.__init__", lambda *a, **k: pytest.fail("loaded anyway"))
    assert main(["generate", "-m", str(tiny_gguf), "--prompt-ids", "1,2", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "needs" in err and "GiB of RAM" in err and "this machine has 0.0 GiB" in err


def test_missing_model_file(tmp_path, capsys):
    assert main(["generate", "-m", str(tmp_path / "none.gguf"), "--prompt-ids", "1", "-n", "1"]) == 2
    assert "no such file" in capsys.readouterr().err
