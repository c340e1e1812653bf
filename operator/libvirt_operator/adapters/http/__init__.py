"""HTTP(S) downloads of install media, with an SSRF guard."""

from .download import DownloadPolicy, DownloadResult, Downloader, Verdict, check_destination, classify, download

__all__ = ["DownloadPolicy", "DownloadResult", "Downloader", "Verdict", "check_destination", "classify", "download"]
