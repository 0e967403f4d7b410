"""WebDAV over the object store: a wsgidav provider for one drive prefix per request.

One :class:`ObjectStoreProvider` serves every caller: the drive it shows is read from
``environ[ENVIRON_KEY]`` (a :class:`DavContext` the ASGI wrapper in gateway/dav_app.py puts
there after authenticating the request), never from the URL alone. Every path goes through
:mod:`drive.keys`, so nothing escapes the caller's prefix.

How a drive looks as WebDAV, and where each part lives:

* :mod:`~drive.dav.context`: the request's :class:`DavContext` and what it remembers; store
  failures as WebDAV statuses.
* :mod:`~drive.dav.provider`: path → resource; ``shared/`` at the root of my drive is virtual
  and read-only, one folder per organisation the caller may read (``orgs/{slug}/``).
* :mod:`~drive.dav.resources`: a file is an object, a folder a key prefix (an empty one holds a
  hidden ``.kgpu-folder`` marker); a folder's members come from one delimited list call per
  1,000 keys, never a HEAD per member.
* a folder's listing comes from the store the gateway holds, a
  :class:`~drive.store.caching.CachingStore`: kept while current, dropped by every write.
* :mod:`~drive.dav.propfind`: PROPFIND Depth 1 of a folder whose members have no dead
  properties or locks, written from the listing with string templates, byte for byte wsgidav's.
* :mod:`~drive.dav.transfer`: COPY and MOVE as server-side copies in the store, 8 at a time.
* :mod:`~drive.dav.bodies`: a PUT's body streamed to the store (committed only when whole), a
  GET read through a presigned URL.
* :mod:`~drive.dav.storage`: dead properties and locks in the main database (gateway replicas
  share them), keyed by the object key (``/users/7/a/b``) so both mount points see the same
  ones; a PROPFIND reads those of a whole folder with one range query each.
"""

from drive.dav.bodies import BodyWriter, PresignedReader
from drive.dav.context import ENVIRON_KEY, SHARED, DavContext, store_errors
from drive.dav.provider import ObjectStoreProvider
from drive.dav.resources import FileResource, FolderResource, SharedRoot
from drive.dav.storage import DbLockManager, DbLockStorage, DbPropertyManager

__all__ = [
    "ENVIRON_KEY",
    "SHARED",
    "BodyWriter",
    "DavContext",
    "DbLockManager",
    "DbLockStorage",
    "DbPropertyManager",
    "FileResource",
    "FolderResource",
    "ObjectStoreProvider",
    "PresignedReader",
    "SharedRoot",
    "store_errors",
]
