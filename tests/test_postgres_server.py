"""tests/postgres_server.py: the PostgreSQL server the SQL prediction-log tests run against is real,
gives each test its own empty database, and leaves nothing behind."""
from __future__ import annotations

import psycopg

from tests.postgres_server import PostgresServer


def test_server_answers_a_query(postgres_url):
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_each_test_database_is_distinct_and_empty(postgres_server):
    first, second = postgres_server.create_database(), postgres_server.create_database()
    assert first != second
    for url in (first, second):
        with psycopg.connect(url) as conn:
            tables = conn.execute("SELECT count(*) FROM information_schema.tables "
                                  "WHERE table_schema = 'public'").fetchone()
            assert tables == (0,)
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE only_here (x int)")
    with psycopg.connect(second) as conn:
        assert conn.execute("SELECT to_regclass('only_here')").fetchone() == (None,)


def test_server_directory_is_removed_after_the_context_exits():
    with PostgresServer() as server:
        root = server.root
        assert (root / "data" / "postmaster.pid").exists()
    assert not root.exists()
