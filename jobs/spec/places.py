"""Places in a spec (URIs and paths): the one check of an s3:// URI, an hf: model id or a local path, and
whether two of them name the same file."""
from __future__ import annotations

import re

from jobs.spec.secret import _refuse_secret, _short


#: A Hugging Face repo id: [org/]name of letters, digits, '-', '_', '.', no '..' or '--' (the hub's own rule).
_HF_ID = re.compile(r"^(?!.*(\.\.|--))[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
#: Schemes someone may write that the job does not read (they would be taken for a local folder named "gs:").
_OTHER_SCHEMES = {"gs", "gcs", "az", "abfs", "abfss", "wasb", "wasbs", "http", "https", "ftp", "sftp", "ssh",
                  "hdfs", "s3a", "s3n", "minio", "r2"}


def _check_uri(value: str, what: str, *, allow_hub: bool = False) -> str:
    """An s3:// URI, an hf: model id (``allow_hub``) or a local path (``file://`` is one too); a near-miss of
    a scheme ('s3:/b/x', 'S3://', 'hf://') is an error with the spelling meant, never read as a local folder."""
    _refuse_secret(value)
    value = value.strip()
    if not value:
        raise ValueError(f"{what} is empty")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):(/*)", value)  # 2+ letters: 'C:' is a Windows drive
    if scheme:
        name, slashes, rest = scheme.group(1), scheme.group(2), value[scheme.end():]
        low = name.lower()
        if low == "s3" and (name != "s3" or slashes != "//"):
            raise ValueError(f"'{_short(value)}' is not an S3 URI (it would be read as a local path): did you mean "
                             f"'{_short('s3://' + rest.lstrip('/'))}'?")
        if low == "hf" and (name != "hf" or slashes):
            raise ValueError(f"'{_short(value)}' is not a model id: write hf:org/name, did you mean "
                             f"'{_short('hf:' + rest)}'?")
        if low == "file" and (name != "file" or slashes not in ("//", "///")):
            raise ValueError(f"'{_short(value)}' is not a file URI: write file:///absolute/path or just the path")
        if low in _OTHER_SCHEMES and "://" not in value:
            raise ValueError(f"unsupported scheme '{_short(name)}:'; use s3://bucket/key or a local path")
    elif re.match(r"^s3//", value, re.IGNORECASE):
        raise ValueError(f"'{_short(value)}' is not an S3 URI (it would be read as a local path): did you mean "
                         f"'{_short('s3://' + value[4:].lstrip('/'))}'?")
    if value.startswith("s3://"):
        rest = value[5:]
        bucket = rest.split("/", 1)[0]
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"'{_short(bucket)}' is not a valid bucket name (3-63 lowercase letters, digits, '.', '-')")
        if ".." in rest.split("/"):
            raise ValueError("'..' is not allowed in an S3 key")
        return value
    if "://" in value and not value.startswith("file://"):
        scheme_name = value.split("://", 1)[0]
        raise ValueError(f"unsupported scheme '{_short(scheme_name)}://'; use s3://bucket/key or a local path")
    if value.startswith("hf:"):
        if not allow_hub:
            raise ValueError("hf: names a model on a hub, and only base_model.uri reads one; use s3://bucket/key "
                             "or a local path")
        if not _HF_ID.match(value[3:]):
            raise ValueError(f"'{_short(value)}' is not a model id: write hf:org/name (letters, digits, '-', '_', "
                             "'.'; no '..', no path): a path would be read from the pod's disk")
    return value


#: The one check of a place (URI or path) for whatever names one outside a spec (`artifacts --output`).
check_uri = _check_uri


def _same_place(a: str, b: str) -> bool:
    """Whether two dataset URIs or paths name the same file (``file://`` and ``./`` spelled away)."""
    import posixpath

    def canon(v: str) -> str:
        v = v[7:] if v.startswith("file://") else v
        return v.rstrip("/") if v.startswith("s3://") else posixpath.normpath(v)

    return canon(a) == canon(b)
