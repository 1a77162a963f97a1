"""The README performance blocks generated from benchmark CSVs (dcnbench.bench.report)."""

from pathlib import Path

from dcnbench.bench.report import markers, read_rows, render_markdown, update_readme

ROOT = Path(__file__).resolve().parents[1]
CPU_CSV = "results/bench/ops_cpu.csv"
CUDA_CSV = "results/bench/ops_cuda.csv"


def test_each_csv_owns_its_readme_block(tmp_path, monkeypatch):
    """Regenerating one CSV's block rewrites that block alone; text around and between blocks stays."""
    monkeypatch.chdir(ROOT)
    readme = tmp_path / "README.md"
    cpu_start, cpu_end = markers(CPU_CSV)
    cuda_start, cuda_end = markers(CUDA_CSV)
    readme.write_text(f"intro\n{cpu_start}\nold cpu\n{cpu_end}\nbetween\n{cuda_start}\nold cuda\n{cuda_end}\nend\n")
    update_readme(readme, CUDA_CSV)
    text = readme.read_text()
    assert "old cpu" in text and "old cuda" not in text
    assert text.startswith("intro\n") and "\nbetween\n" in text and text.endswith("end\n")
    assert render_markdown(read_rows(CUDA_CSV), CUDA_CSV) in text


def test_cuda_block_names_the_card_and_float32_mode_and_skips_cpu_targets(monkeypatch):
    monkeypatch.chdir(ROOT)
    cuda = render_markdown(read_rows(CUDA_CSV), CUDA_CSV)
    first = read_rows(CUDA_CSV)[0]
    assert first["machine"] in cuda and f"{first['float32_mode']} arithmetic" in cuda
    assert "Targets of issue 3" not in cuda
    assert "Targets of issue 3" in render_markdown(read_rows(CPU_CSV), CPU_CSV)
