"""The exporters room's one exception family. Messages say what is wrong and what to do."""


class ExportError(Exception):
    """Base for everything exporters/ raises on purpose (export, bundles, registry, storage)."""


class StorageError(ExportError):
    """A store (local dir or S3) is unreachable, denies access, or lacks an object."""


class RegistryError(ExportError):
    """A registry operation is refused: unknown version, bad name, corrupt bundle..."""


class AliasMoved(RegistryError):
    """A conditional promote found the alias no longer where the caller expected it."""
