"""Fixtures for the transport tests (async tests run through transport_testing.run, no pytest plugin).

The shared ``tls_files`` fixture lives in tests/conftest.py.
"""
