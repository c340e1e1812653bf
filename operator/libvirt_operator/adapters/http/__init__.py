"""HTTP(S) downloads of install media, with an SSRF guard."""

from .download import DownloadPolicy, DownloadResult, Downloader, check_destination, download

__all__ = ["DownloadPolicy", "DownloadResult", "Downloader", "check_destination", "download"]
