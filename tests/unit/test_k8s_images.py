"""The manifests never name an image somebody else could publish (issue 25, item 6): every
image reference in scripts/k8s is under ``.invalid`` (RFC 2606: never resolves) until an
operator's overlay names theirs, and the README's overlay does that with kubectl alone."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

K8S = Path(__file__).resolve().parents[2] / "scripts" / "k8s"
PLACEHOLDER = "tencrypt.invalid/tencrypt"


def images(doc: object) -> list[str]:
    """Every ``image:`` value anywhere in a parsed manifest."""
    if isinstance(doc, dict):
        found = [doc["image"]] if isinstance(doc.get("image"), str) else []
        return found + [i for v in doc.values() for i in images(v)]
    if isinstance(doc, list):
        return [i for v in doc for i in images(v)]
    return []


def test_every_image_in_the_manifests_is_the_unresolvable_placeholder() -> None:
    named = [
        (path.name, image)
        for path in sorted(K8S.rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        for image in images(doc)
        if "example" not in path.name  # examples run busybox-like demo pods, not our image
    ]
    ours = [(f, i) for f, i in named if "tencrypt" in i]
    assert {f for f, _ in ours} >= {"daemonset.yaml", "key-rotation-cronjob.yaml"}
    assert all(i.split(":")[0] == PLACEHOLDER for _, i in ours), ours
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert [e["name"] for e in kustomization["images"]] == [PLACEHOLDER]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on this machine")
def test_the_readmes_overlay_names_your_image_with_kubectl_alone(tmp_path: Path) -> None:
    """The README's "Install" overlay, rendered by kubectl's built-in kustomize: every
    container (and the optional CronJob's, when listed) runs the operator's image."""
    readme = (K8S / "README.md").read_text()
    start = readme.index("cat > my-tencrypt/kustomization.yaml <<'EOF'\n")
    body = readme[start:].split("\n", 1)[1].split("\nEOF\n", 1)[0]
    overlay = tmp_path / "my-tencrypt"
    overlay.mkdir()
    base = overlay / "base"  # the README's ../scripts/k8s, made relative to this overlay
    base.symlink_to(K8S)
    text = body.replace("../scripts/k8s", "base")
    text = text.replace("resources: [base]", "resources: [base, base/optional]")
    (overlay / "kustomization.yaml").write_text(text + "\n")
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    used = [i for d in docs for i in images(d)]
    assert used and set(used) == {"registry.example.com/tencrypt:0.1.0"}, used
    kinds = {d["kind"] for d in docs if any(images(d))}
    assert kinds == {"DaemonSet", "CronJob"}
