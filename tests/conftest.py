from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401  (fixtures: a real S3 endpoint via moto)
