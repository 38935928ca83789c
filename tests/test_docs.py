"""The README front page and the docs pages: short, linked, and speaking only of the product."""
import re
import subprocess

from conftest import REPO


def _tracked():
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout: look at the files on disk
        return [p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    return out.stdout.split()


def test_readme_front_page_is_short_and_its_links_exist():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\((docs/[^)#]+)\)", readme)
    assert {"docs/weights.md", "docs/models.md", "docs/evaluation.md", "docs/speed.md"} <= set(links)
    for link in links:
        assert (REPO / link).is_file(), link
    anchors = re.findall(r"\]\(#([^)]+)\)", readme)
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^## (.+)$", readme, re.M)}
    assert set(anchors) <= headings, set(anchors) - headings


def test_no_tracked_file_speaks_of_development_sittings():
    offenders = []
    for name in _tracked():
        path = REPO / name
        if path.suffix in {".safetensors", ".png", ".so", ".pth", ".pt", ".onnx"} or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if name == "tests/test_docs.py":
                continue
            if re.search(r"\bsessions?\b", line, re.I) and not re.search(r"InferenceSession|SessionOptions|ort\.|"
                                                                           r"onnxruntime|self\.session|_session",
                                                                           line):
                offenders.append(f"{name}:{i}: {line.strip()[:100]}")
            if re.search(r"this project's (2-core|CPU|shared)|no GPU was lent", line, re.I):
                offenders.append(f"{name}:{i}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders[:20])


def test_packaged_configs_and_cards_do_not_name_the_shared_folder():
    src = REPO / "src" / "distillsr"
    for path in [*src.glob("configs/*.yaml"), *src.glob("weights/*.json")]:
        assert "../shared" not in path.read_text(), path
