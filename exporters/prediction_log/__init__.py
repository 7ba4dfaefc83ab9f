"""The prediction log: records, the SQLite/PostgreSQL implementation and its schema, the review queue, the pre-SQL S3 importer. torch-free."""
