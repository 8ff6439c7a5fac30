"""CLI commands end to end (in process)."""
import json

from edgesparse.apps.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["cpu"]["available"] and set(info["backends"]) == {"cpu", "cuda", "cann"}
    assert info["auto"] in info["backends"]


def test_generate_json_and_stream(capsys, llama_relu):
    assert main(["generate", str(llama_relu), "--prompt", "The quick", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ffn_mode"] == "exact" and out["tokens"] >= 1
    # the checkpoint has a chat template: a bare prompt goes through it, and --json says so
    assert out["chat_template"] is True and out["attn_mode"] == "dense" and out["topk_kept"] == {}
    assert 0 <= out["ffn_sparsity"] <= 1 and 0 <= out["gate_sparsity"] <= 1
    assert main(["generate", str(llama_relu), "--prompt", "The quick", "--max-new-tokens", "6", "--stream",
                 "--raw"]) == 0
    assert capsys.readouterr().out.startswith("The quick")   # a raw completion follows its prompt
    assert main(["generate", str(llama_relu), "--prompt", "The quick", "--max-new-tokens", "6", "--json",
                 "--raw"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["chat_template"] is False
    import edgesparse
    llm = edgesparse.load(llama_relu)
    want = llm.generate(llm.chat_prompt([{"role": "user", "content": "The quick"}]), max_new_tokens=6,
                        stop_token_ids=llm.chat_stop_ids())
    assert out["text"] == want.text


def test_calibrate_and_eval_ppl_cli(capsys, llama_relu, tmp_path):
    from conftest import DATA
    data = tmp_path / "t.txt"
    data.write_text((DATA / "tinyshakespeare.txt").read_text()[:40_000])
    assert main(["--quiet", "calibrate", str(llama_relu), "-o", str(tmp_path / "a"), "--data", str(data),
                 "--tokens", "2048", "--rank", "8", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["layers"]) == 2
    assert main(["--quiet", "calibrate", str(llama_relu), "-o", str(tmp_path / "fp"), "--data", str(data),
                 "--tokens", "2048", "--rank", "8", "--float-predictor"]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "fp" / "manifest.json").read_text())
    assert manifest["calibration"]["predictor_factors"] == "float"
    assert main(["--quiet", "eval", "ppl", str(llama_relu), "--artifacts", str(tmp_path / "a"), "--data", str(data),
                 "--window", "64", "--max-tokens", "512", "--json", "--plot", str(tmp_path / "p.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ffn_mode"] == "predictor" and (tmp_path / "p.png").stat().st_size > 1000
    assert out["sparse_vs_dense"]["windows"] == 8
    # the int8 and float predictors on the same windows, paired
    assert main(["--quiet", "eval", "ppl", str(llama_relu), "--artifacts", str(tmp_path / "a"), "--data", str(data),
                 "--window", "64", "--max-tokens", "512", "--json", "--compare", str(tmp_path / "fp")]) == 0
    cmp = json.loads(capsys.readouterr().out)["compared"]
    assert cmp["ffn_mode"] == "predictor" and cmp["vs_sparse"]["windows"] == 8 and cmp["ppl"] > 0
    assert main(["--quiet", "eval", "ppl", str(llama_relu), "--data", str(data), "--compare", str(tmp_path / "no")]) == 2
    assert main(["calibrate", str(llama_relu), "-o", str(tmp_path / "b"), "--data", str(tmp_path / "none.txt")]) == 2
