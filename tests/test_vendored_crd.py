"""The MPI Operator's MPIJob CRD that tests/test_k8s.py validates against is vendored in
k8s/schemas/ as released: the file its README names (sha1 and size), not an edited or
partial copy."""

import hashlib
import re

from conftest import REPO

SCHEMAS = REPO / "k8s" / "schemas"


def test_the_vendored_crd_is_the_release_its_readme_names():
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    digest = re.search(r"sha1 `([0-9a-f]{40})`", readme).group(1)
    size = int(re.search(r"([\d,]+) bytes", readme).group(1).replace(",", ""))
    crd = (SCHEMAS / "kubeflow.org_mpijobs.yaml").read_bytes()
    assert (hashlib.sha1(crd).hexdigest(), len(crd)) == (digest, size)
    assert b"\nkind: CustomResourceDefinition\n" in crd and b"\n  - name: v2beta1\n" in crd
