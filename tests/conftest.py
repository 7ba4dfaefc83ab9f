from tests.s3_server import s3_bucket, s3_endpoint, store  # noqa: F401  (fixtures: a real S3 endpoint via moto; a store on both backends)
from tests.postgres_server import postgres_server, postgres_url  # noqa: F401  (fixtures: a real PostgreSQL server; a fresh database per test)
