"""Test support code shared by several test packages (proxies, fakes of hardware)."""
