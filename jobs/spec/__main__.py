"""python -m jobs.spec > docs/spec-reference.md"""
from jobs.spec.reference import reference_markdown

print(reference_markdown(), end="")
