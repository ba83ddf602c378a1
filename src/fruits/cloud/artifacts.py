"""What a cluster's nodes and steps read from the project bucket, whichever backend runs them: the
bootstrap script, the pins, the packaged code and the stage entry point, and the step's command line."""

from __future__ import annotations

import io
import zipfile

from omegaconf import DictConfig

from fruits.core.config import PROJECT_ROOT


def artifact_uris(cfg: DictConfig) -> dict[str, str]:
    """Where `make cluster` puts what the nodes and the steps need (prefixes from storage.uris)."""
    uris = cfg.storage.uris
    return {
        "bootstrap": f"{uris.bootstrap}/install-deps.sh",
        "requirements": f"{uris.bootstrap}/runtime.txt",
        "constraints": f"{uris.bootstrap}/lock.txt",
        "code": f"{uris.code}/fruits.zip",
        "entry": f"{uris.code}/run_stage.py",
        "logs": uris.logs,
    }


def package_code() -> bytes:
    """The fruits package as a zip for spark-submit --py-files: its modules and the files they read
    (the report's templates), no bytecode."""
    buffer = io.BytesIO()
    package = PROJECT_ROOT / "src" / "fruits"
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            archive.write(path, path.relative_to(PROJECT_ROOT / "src").as_posix())
    return buffer.getvalue()


def upload_artifacts(cfg: DictConfig, s3) -> dict[str, str]:
    """Upload them with the given S3 client (the cluster's own S3: AWS, an endpoint or the stand-in)."""
    uris = artifact_uris(cfg)
    files = {
        "bootstrap": (PROJECT_ROOT / "bootstrap" / "install-deps.sh").read_bytes(),
        "requirements": (PROJECT_ROOT / "requirements" / "runtime.txt").read_bytes(),
        "constraints": (PROJECT_ROOT / "requirements" / "lock.txt").read_bytes(),
        "code": package_code(),
        "entry": (PROJECT_ROOT / "bootstrap" / "run_stage.py").read_bytes(),
    }
    for name, body in files.items():
        bucket, key = uris[name][len("s3://"):].split("/", 1)
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return uris


def spark_submit_command(cfg: DictConfig, stage: str, run_uri: str, master: str = "yarn") -> list[str]:
    """The step's command line, whichever cluster manager runs it (YARN on EMR, spark:// standalone)."""
    uris = artifact_uris(cfg)
    return ["spark-submit", "--master", master, "--deploy-mode", "client",
            "--py-files", uris["code"], uris["entry"], stage, run_uri]
