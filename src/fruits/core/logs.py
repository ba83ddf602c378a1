"""What a run prints: the stages, their results and warnings; the libraries' chatter only with -v.

Quiet by default: TensorFlow's C++ and absl lines, Spark's JVM warnings (hostname, native Hadoop) and
py4j are held back. `-v` (or FRUITS_LOG_LEVEL=DEBUG) brings them back for debugging, except the AWS
SDK's wire logs, which print request headers: those stay at WARNING. Whatever the level, a value of
the AWS credentials in the environment is masked in every log record.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from fruits.core.errors import ExpectedFailure

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LEVEL_VARIABLE = "FRUITS_LOG_LEVEL"  # also read by the Spark session: set by configure for the stages
CHATTY = ("py4j", "absl", "tensorflow", "tf2onnx", "h5py", "PIL", "matplotlib", "numba", "fsspec", "s3fs", "asyncio")
WIRE = ("botocore", "boto3", "urllib3", "aiobotocore", "s3transfer")  # log headers (signatures) at DEBUG
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SPARK_LOG_CONFIG = Path(__file__).with_name("log4j2-quiet.properties")


def verbose() -> bool:
    return os.environ.get(LEVEL_VARIABLE, "INFO").upper() == "DEBUG"


class MaskSecrets(logging.Filter):
    """Replaces the values of the AWS credential variables in a record's final message by '***'."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets = [os.environ[name] for name in SECRET_VARIABLES if len(os.environ.get(name, "")) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            masked = message
            for secret in self.secrets:
                masked = masked.replace(secret, "***")
            if masked != message:
                record.msg, record.args = masked, None
        return True


def configure(debug: bool = False, level: int = logging.INFO) -> None:
    """Logging for every command line of the package (stages, the app, the cloud runners): debug=True
    is -v; level is the quiet level (the identify CLI prints only warnings)."""
    if debug:
        os.environ[LEVEL_VARIABLE] = "DEBUG"
    debug = verbose()
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no oneDNN/absl lines
    logging.basicConfig(level=logging.DEBUG if debug else level, format=LOG_FORMAT, force=True)
    mask = MaskSecrets()
    for handler in logging.getLogger().handlers:
        handler.addFilter(mask)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    for name in WIRE:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def native_notices_hidden():
    """Standard error (fd 2) to /dev/null while TensorFlow loads: 2.21 writes its absl and oneDNN
    notices there whatever TF_CPP_MIN_LOG_LEVEL says. Nothing is hidden with -v."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# What the AWS SDK raises for a person's set-up, not a bug: no credentials, an endpoint it cannot reach.
AWS_SET_UP_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "NoRegionError", "EndpointConnectionError",
                     "ConnectTimeoutError", "CredentialRetrievalError")


AWS_HINTS = {
    "NoCredentialsError": "no AWS credentials found: set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), "
                          "or run `aws configure`; without an AWS account, `make cluster CLUSTER=standalone` uses a local S3 stand-in",
    "PartialCredentialsError": "incomplete AWS credentials: check AWS_PROFILE or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    "EndpointConnectionError": "AWS unreachable (check the network, or storage.endpoint_url / cluster.endpoint_url)",
    "ConnectTimeoutError": "AWS unreachable (check the network, or storage.endpoint_url / cluster.endpoint_url)",
}


def aws_set_up_error(err: BaseException) -> str | None:
    """The name of the AWS SDK's set-up error err is, if it is one."""
    return next((kind.__name__ for kind in type(err).__mro__
                 if kind.__module__.startswith("botocore") and kind.__name__ in AWS_SET_UP_ERRORS), None)


def expected(err: BaseException) -> bool:
    """A failure a person meets and mends (errors.ExpectedFailure, a missing file or table, AWS set-up)."""
    return isinstance(err, (ExpectedFailure, FileNotFoundError)) or aws_set_up_error(err) is not None


def one_line(err: BaseException) -> str:
    """What a person reads: the error's own words, after what to do about it for the AWS SDK's."""
    said = " ".join(str(err).split()) or type(err).__name__
    hint = AWS_HINTS.get(aws_set_up_error(err) or "")
    return f"{hint}: {said}" if hint else said


def run_command(main, argv: list[str] | None = None) -> None:
    """A command line's main: an expected failure is one line on stderr and exit status 2, its traceback
    only with -v (FRUITS_LOG_LEVEL=DEBUG); anything else is a bug and keeps its traceback."""
    try:
        main(argv)
    except Exception as err:
        if not expected(err) or verbose():
            raise
        print(f"error: {one_line(err)} (-v for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
