"""Network paths for GDAL: URIs mapped to /vsi paths; transient read failures told from lasting ones."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from xml.etree import ElementTree

log = logging.getLogger(__name__)

#: URI schemes and the GDAL virtual file system that reads them in ranges.
URI_PREFIXES = {
    "https://": "/vsicurl/https://",
    "http://": "/vsicurl/http://",
    "s3://": "/vsis3/",
    "gs://": "/vsigs/",
    "az://": "/vsiaz/",
}
#: GDAL virtual file systems that go over the network (also when nested, e.g. /vsizip//vsicurl/...).
NETWORK_VSI = ("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift", "/vsiwebhdfs")

#: Tries of one window read from a remote scene before the scene fails.
READ_ATTEMPTS = 6
#: Seconds before the second try; doubled before each further one (1, 2, 4, 8, 16 s: 31 s in all).
READ_BACKOFF_S = 1.0
#: Seconds after a window read began when no further try starts: a server that stalls each
#: transfer fails each try only at GDAL's low-speed timeout (60 s), which six tries would wait out.
READ_GIVE_UP_S = 120.0
#: GDAL settings around each window read of a remote scene (in the reading thread only). geoseg
#: tries a failed read again itself, on a reopened file with its cached bytes dropped, waiting in a
#: way a stopped run interrupts; GDAL's own retries of each request would multiply the attempts and
#: the wait (its 5 retries slept ~23 s per request, several requests per read) and cannot be
#: interrupted. An environment variable of the same name wins.
READ_GDAL_OPTIONS = {"GDAL_HTTP_MAX_RETRY": "0"}

# What GDAL says when bytes did not arrive (a failed range request leaves the TIFF reader short of
# bytes), or when HTTP or curl failed. Decoding errors (corrupt data) are not in the list.
_SHORT_READ_RE = re.compile(r"got \d+ bytes|read error", re.IGNORECASE)
_TRANSIENT_RE = re.compile(
    r"got \d+ bytes|read error|timed? ?out|timeout|connection|(?<!/vsi)curl|could not resolve|ssl|"
    r"HTTP (?:error|response) code: (?:5\d\d|429)",
    re.IGNORECASE,
)
# A status that asking again will not change: bad credentials, missing object.
_LASTING_HTTP_RE = re.compile(r"HTTP (?:error|response) code: (?:40[0-4]|410)\b", re.IGNORECASE)
_HTTP_MESSAGE_RE = re.compile(r"(HTTP (?:error|response) code: \d+|curl error: [^.]*)", re.IGNORECASE)


def gdal_path(src: str) -> str:
    """The path GDAL opens for ``src``.

    ``https://`` and ``http://`` -> ``/vsicurl/``, ``s3://`` -> ``/vsis3/``, ``gs://`` -> ``/vsigs/``,
    ``az://`` -> ``/vsiaz/``; anything else unchanged (local paths, /vsi paths).
    """
    for prefix, vsi in URI_PREFIXES.items():
        if src.startswith(prefix):
            return vsi + src[len(prefix) :]
    return src


# A comma that starts another URI or GDAL path: where a list of URLs with query strings (which
# may hold commas themselves) is split.
_NEXT_URI_RE = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://|/vsi)")


def split_list(text: str) -> list[str]:
    """Comma-separated paths as a list: at every comma, or, when ``text`` holds a URL query
    string (``?``), only at commas that start another URI or /vsi path."""
    parts = _NEXT_URI_RE.split(text) if "?" in text else text.split(",")
    return [part.strip() for part in parts]


def is_remote(path: str) -> bool:
    """Whether reading ``path`` (a GDAL path, a URI, or VRT XML text) goes over the network."""
    return any(vsi in path for vsi in NETWORK_VSI) or any(p in path for p in URI_PREFIXES)


#: Do not list a remote file's folder on open: each listing costs requests, and a remote scene's
#: sidecar files are not looked for. Local files keep GDAL's default, which finds them.
NO_LISTING = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


@contextmanager
def listing_off_if_remote(path: str) -> Iterator[None]:
    """Around one open of ``path``: :data:`NO_LISTING` where it is remote (unless the environment says)."""
    import os

    import rasterio

    options = {k: v for k, v in NO_LISTING.items() if k not in os.environ} if is_remote(path) else {}
    if not options:
        yield
        return
    with rasterio.Env(**options):
        yield


def display_name(src: str) -> str:
    """``src`` as shown in messages and tags.

    URLs lose their query string and user info, which may hold credentials (a presigned URL's
    signature, ``user:password@``).
    """
    if "://" not in src:
        return src
    head, sep, url = src.rpartition("/vsicurl/") if "/vsicurl/" in src else ("", "", src)
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return src
    netloc = parts.netloc.rpartition("@")[2]
    return head + sep + urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def network_files(path: str) -> list[str]:
    """The GDAL paths read over the network when GDAL opens ``path`` (VRT text: its source files)."""
    if path.lstrip().startswith("<"):
        try:
            sources = [e.text or "" for e in ElementTree.fromstring(path).iter("SourceFilename")]
        except ElementTree.ParseError:
            sources = []
    else:
        sources = [path]
    return [p for p in dict.fromkeys(sources) if is_remote(p)]


def forget_fetched_bytes(path: str) -> bool:
    """Drop what GDAL keeps from the network for the files read through ``path``.

    GDAL caches fetched ranges and file sizes process-wide, including what arrived of a transfer
    cut short, and serves them to a reopened file too: a read tried again would meet the same
    short bytes and never ask the server. GDAL's ``VSICurlPartialClearCache`` drops one file's
    entries (``VSICurlClearCache`` all, for a network file inside an archive); rasterio does not
    expose them, so they are called in the libgdal rasterio loaded. Returns whether that worked
    (``False``: no such library found; the retry then reads what GDAL kept).
    """
    gdal = _libgdal()
    if gdal is None:
        return False
    files = network_files(path)
    # NOTE: each network file system parses the prefix as its own kind of path; the others'
    # complaints ("URL rejected") mean nothing here and are silenced.
    gdal.CPLPushErrorHandler(gdal.CPLQuietErrorHandler)
    try:
        for file in files:
            if file.startswith(NETWORK_VSI):
                gdal.VSICurlPartialClearCache(file.encode())
            else:  # e.g. /vsizip//vsicurl/...: the archive's own path is not a prefix of this one
                gdal.VSICurlClearCache()
    finally:
        gdal.CPLPopErrorHandler()
    return True


_LIBGDAL: list[Any] = []


def _libgdal() -> Any:
    """GDAL's C library as rasterio loaded it (ctypes), or ``None``; looked up once."""
    if not _LIBGDAL:
        _LIBGDAL.append(_load_libgdal())
    return _LIBGDAL[0]


def _load_libgdal() -> Any:
    import ctypes
    import ctypes.util
    import glob
    import os

    import rasterio._base  # loads libgdal

    # NOTE: the copy rasterio loaded, not another one mapped into this process: wheels bundle their
    # own (fiona's too), and each copy has its own cache. A wheel's copy lies in rasterio.libs
    # (.dylibs on macOS); a system one outside site-packages.
    package = os.path.dirname(rasterio.__file__)
    site_packages = os.path.dirname(package)
    mapped: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            mapped = [line.split()[-1] for line in maps if "/libgdal" in line]
    except OSError:  # not Linux
        pass
    bundled = glob.glob(os.path.join(site_packages, "rasterio.libs", "libgdal*"))
    bundled += glob.glob(os.path.join(package, ".dylibs", "libgdal*"))
    candidates = [p for p in mapped if p in bundled] + bundled
    candidates += [p for p in mapped if not p.startswith(site_packages)]
    candidates += [name for name in [ctypes.util.find_library("gdal")] if name and not bundled]
    for candidate in dict.fromkeys(candidates):
        try:
            lib = ctypes.CDLL(candidate)
            lib.VSICurlPartialClearCache.argtypes = [ctypes.c_char_p]
            lib.VSICurlPartialClearCache.restype = None
            lib.VSICurlClearCache.argtypes = []
            lib.VSICurlClearCache.restype = None
            lib.CPLPushErrorHandler.argtypes = [ctypes.c_void_p]
            lib.CPLPushErrorHandler.restype = None
            lib.CPLPopErrorHandler.argtypes = []
            lib.CPLPopErrorHandler.restype = None
            lib.CPLQuietErrorHandler = ctypes.cast(lib.CPLQuietErrorHandler, ctypes.c_void_p)
        except (OSError, AttributeError):
            continue
        return lib
    log.debug("libgdal not found; a failed remote read is tried again on the bytes GDAL kept")
    return None


# A URL's user info (``user:password@``), and a query string of key=value pairs after a path,
# up to a quote, a space, or a comma, semicolon, colon or full stop before a space (how GDAL's
# messages go on after a file name: "x.tif?sig=S, band 1", "...x.tif?sig=S. Retrying").
_USERINFO_RE = re.compile(r"(?<=://)[^/\s@'\"<>]+@")
_QUERY_RE = re.compile(r"\?[^\s'\"<>?=&]+=[^\s'\"<>]*?(?=[,;:.]?(?:\s|$)|['\"<>])")


# curl's words for GDAL dropping an error page's body: nothing a user can act on.
_CURL_NOISE_RE = re.compile(r"(HTTP response code: [1-9]\d\d) - Failure writing output to destination[^;)]*")


def plain_message(text: str) -> str:
    """A GDAL message as shown to the user: :func:`redact` ed, without curl's internal words."""
    return _CURL_NOISE_RE.sub(r"\1", redact(text))


def redact(text: str) -> str:
    """``text`` without URL query strings and user info, which may hold credentials.

    For messages that quote paths as GDAL does (a presigned URL, or just its file name with the
    query); see :func:`display_name` for a path alone.
    """
    return _QUERY_RE.sub("", _USERINFO_RE.sub("", text))


def error_text(err: BaseException) -> str:
    """The messages of ``err`` and of the errors that caused it, joined: GDAL's outermost read
    error ("IReadBlock failed") hides why (the cause says "Read error ... got 0 bytes")."""
    texts = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(str(current))
        current = current.__cause__ or current.__context__
    return " | ".join(texts)


def looks_transient(message: str) -> bool:
    """Whether a failed read is worth trying again.

    Yes for HTTP 5xx or 429, a timeout, a curl or connection error, or bytes that did not
    arrive; no for decoding errors. GDAL does not report the HTTP status of a failed range
    read, so a missing object (404) mid-scene looks the same as a dropped connection; the
    reopen before the next try meets the 404 (:func:`looks_lasting`).
    """
    return bool(_TRANSIENT_RE.search(message)) and not _LASTING_HTTP_RE.search(message)


def looks_lasting(message: str) -> bool:
    """Whether ``message`` reports an HTTP status that asking again will not change (401-404, 410)."""
    return bool(_LASTING_HTTP_RE.search(message))


def looks_short(message: str) -> bool:
    """Whether GDAL's ``message`` says that fewer bytes arrived than it asked for."""
    return bool(_SHORT_READ_RE.search(message))


class _HttpMessages(logging.Handler):
    """Keeps the HTTP and curl messages GDAL reports in one thread.

    GDAL reports an HTTP failure as a warning ("HTTP error code: 503 - URL. Retrying again in
    0.5 secs"), which rasterio logs to ``rasterio._err``; the read error raised afterwards only
    says that bytes were missing. Collecting the warning lets the final message say why.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            match = _HTTP_MESSAGE_RE.search(record.getMessage())
            if match:
                self.messages.append(match.group(1))


@contextmanager
def http_messages() -> Iterator[list[str]]:
    """Collect, in a list, the HTTP and curl messages GDAL logs in this thread inside the block."""
    handler = _HttpMessages()
    logger = logging.getLogger("rasterio._err")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def describe(path: str) -> str:
    """A GDAL path as the user would name it in a message.

    ``/vsicurl/https://...`` as the URL (without its query), ``/vsis3/b/k`` as ``s3://b/k``,
    VRT XML text as "VRT band stack".
    """
    if path.lstrip().startswith("<"):
        return "VRT band stack"
    for prefix, vsi in URI_PREFIXES.items():
        if path.startswith(vsi):
            return display_name(prefix + path[len(vsi) :])
    return display_name(path)
