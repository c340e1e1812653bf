"""LibvirtHost URIs: every way a URI could make the operator read a file, run a program, reach a socket
or skip verification is refused; ordinary URIs pass and render unchanged."""

from __future__ import annotations

import pytest

from libvirt_operator.core import hosturi
from libvirt_operator.core.hosturi import HostUriError, check_policy, parse

GOOD = [
    "qemu:///system",
    "qemu:///session",
    "qemu+unix:///system",
    "qemu+ssh://root@kvm-01.example.com/system",
    "qemu+ssh://root@127.0.0.1:2222/system?mode=legacy",
    "qemu+ssh://root@[::1]:2222/system?proxy=native&mode=auto",
    "qemu+libssh://root@kvm-01/system",
    "qemu+libssh2://root@kvm-01/system",
    "qemu+tls://kvm-01.example.com/system",
    "qemu://kvm-01.example.com:16514/system",
    "qemu+tcp://127.0.0.1:16509/system",
    "test:///default",
    "test:///tmp/hosts/a.xml",
]


@pytest.mark.parametrize("uri", GOOD)
def test_ordinary_uris_parse_and_render_unchanged(uri: str) -> None:
    assert parse(uri).render() == uri


HOSTILE = {
    # files, sockets, programs, verification: only the operator sets these
    "qemu+ssh://root@h/system?keyfile=/var/run/secrets/kubernetes.io/serviceaccount/token": "keyfile",
    "qemu+ssh://root@h/system?known_hosts=/dev/null": "known_hosts",
    "qemu+tls://h/system?pkipath=/tmp/evil": "pkipath",
    "qemu+ssh://root@h/system?command=/bin/sh": "command",
    "qemu+ssh://root@h/system?socket=/run/docker.sock": "socket",
    "qemu+ssh://root@h/system?no_verify=1": "no_verify",
    "qemu+ssh://root@h/system?netcat=/tmp/x": "netcat",
    "qemu+ssh://root@h/system?no_tty=0": "no_tty",
    "qemu+libssh://root@h/system?sshauth=password": "sshauth",
    "qemu+libssh://root@h/system?known_hosts_verify=ignore": "known_hosts_verify",
    "qemu+tls://h/system?tls_priority=NORMAL": "tls_priority",
    "qemu+ssh://root@h/system?name=test:///etc/shadow": "name",
    "qemu+ssh://root@h/system?authfile=/etc/libvirt/auth.conf": "authfile",
    "qemu+ssh://root@h/system?mode=legacy&keyfile=/x": "keyfile",
    # spellings libvirt would still understand
    "qemu+ssh://root@h/system?KEYFILE=/x": "keyfile",
    "qemu+ssh://root@h/system?No_Verify=1": "no_verify",
    "qemu+ssh://root@h/system?%6Beyfile=/x": "percent",
    "qemu+ssh://root@h/system?mode=legacy;keyfile=/x": "';'",
    "qemu+ssh://root@h/system?mode=legacy&mode=auto": "twice",
    "qemu+ssh://root@h/system?mode=direct": "mode may only be",
    "qemu+ssh://root@h/system?mode=sideways": "mode may only be",
    "qemu+ssh://root@h/system?mode": "malformed",
    "qemu+ssh://root@h/system?": "empty query",
    "qemu+ssh://root@h/system?mode=legacy&": "malformed",
    # authority and shape
    "qemu+ssh://root:hunter2@h/system": "password",
    "qemu+ssh://root@h/system#frag": "fragment",
    "qemu+ssh://root@h/system ": "' '",
    " qemu+ssh://root@h/system": "' '",
    "qemu+ssh://root@h/sys\ttem": "'\\t'",
    "qemu+ssh://-oProxyCommand=x@h/system": "user name",
    "qemu+ssh://root@-oProxyCommand=x/system": "host must be",
    "qemu+ssh://root@h:0/system": "port",
    "qemu+ssh://root@h:99999/system": "port",
    "qemu+ssh:///system": "needs a host",
    "qemu+unix://h/system": "no user or host",
    "qemu:///system?socket=/run/x": "socket",
    "qemu:///embed?root=/var/lib/x": "'root'",
    "qemu:///embed": "/system or /session",
    "qemu+ssh://root@h/": "/system or /session",
    "qemu+ext:///system?command=/bin/sh": "transport",
    "qemu+fd:///system": "transport",
    "xen:///system": "must start with",
    "QEMU+SSH://root@h/system": "must start with",
    "qemu+ssh://root@h\u00e9/system": "ASCII",
    # the test driver reads local files
    "test:///var/run/secrets/kubernetes.io/serviceaccount/token": ".xml",
    "test:///etc/../var/run/secrets/x.xml": "'..'",
    "test:///tmp/./a.xml": "'..'",
    "test:////etc/a.xml": "'..'",
    "test://h/default": "without a host",
    "test:///default?x=1": "not allowed",
    "test:///default?mode=auto": "no query",
    "test+ssh://h/default": "must start with",
}


@pytest.mark.parametrize("uri, why", HOSTILE.items())
def test_hostile_uris_are_refused_with_a_reason(uri: str, why: str) -> None:
    with pytest.raises(HostUriError) as info:
        parse(uri)
    assert why in str(info.value)
    assert "hunter2" not in str(info.value)


def test_operator_parameters_are_added_only_by_render() -> None:
    parsed = parse("qemu+ssh://root@127.0.0.1:2222/system?mode=legacy")
    assert parsed.render([("command", "/tmp/lvop-cred-x/ssh"), ("no_tty", "1")]) == (
        "qemu+ssh://root@127.0.0.1:2222/system?mode=legacy&command=/tmp/lvop-cred-x/ssh&no_tty=1")
    assert parsed.ssh and parsed.endpoint == "127.0.0.1:2222" and not parsed.local


def test_tcp_needs_insecure() -> None:
    parsed = parse("qemu+tcp://127.0.0.1:16509/system")
    with pytest.raises(HostUriError, match="insecure: true"):
        check_policy(parsed, insecure=False, allow_test_driver=False)
    check_policy(parsed, insecure=True, allow_test_driver=False)


def test_test_driver_needs_the_operator_flag() -> None:
    with pytest.raises(HostUriError, match="--allow-test-driver"):
        check_policy(parse("test:///default"), insecure=False, allow_test_driver=False)
    check_policy(parse("test:///default"), insecure=False, allow_test_driver=True)


def test_test_driver_files_only_under_the_configured_directories(tmp_path) -> None:
    allowed = tmp_path / "hosts"
    allowed.mkdir()
    (allowed / "a.xml").write_text("<node/>")
    check_policy(parse(f"test://{allowed}/a.xml"), insecure=False, allow_test_driver=True,
                 test_driver_dirs=[str(allowed)])
    with pytest.raises(HostUriError, match="--test-driver-dir"):  # no directories: only test:///default
        check_policy(parse(f"test://{allowed}/a.xml"), insecure=False, allow_test_driver=True)
    with pytest.raises(HostUriError, match="--test-driver-dir"):
        check_policy(parse("test:///etc/libvirt/x.xml"), insecure=False, allow_test_driver=True,
                     test_driver_dirs=[str(allowed)])
    with pytest.raises(HostUriError, match="--test-driver-dir"):  # a sibling sharing the prefix
        check_policy(parse(f"test://{allowed}-evil/a.xml"), insecure=False, allow_test_driver=True,
                     test_driver_dirs=[str(allowed)])
    # a symlink inside the directory pointing out of it
    outside = tmp_path / "secret.xml"
    outside.write_text("token")
    (allowed / "link.xml").symlink_to(outside)
    with pytest.raises(HostUriError, match="--test-driver-dir"):
        check_policy(parse(f"test://{allowed}/link.xml"), insecure=False, allow_test_driver=True,
                     test_driver_dirs=[str(allowed)])


def test_missing_secret_keys_are_named_expected_and_found() -> None:
    keys = hosturi.secret_keys(parse("qemu+ssh://root@h:2222/system"))
    assert keys is not None
    message = hosturi.missing_keys_message("ns/creds", keys, ["ssh-privatekey", "id_rsa"])
    assert message is not None
    assert "has no key known_hosts" in message
    assert "expected keys ssh-privatekey, known_hosts" in message
    assert "found keys: id_rsa, ssh-privatekey" in message
    assert hosturi.missing_keys_message("ns/creds", keys, ["ssh-privatekey", "known_hosts"]) is None
    tls = hosturi.secret_keys(parse("qemu+tls://h/system"))
    assert tls is not None and "found keys: none" in (hosturi.missing_keys_message("ns/c", tls, []) or "")
    assert hosturi.secret_keys(parse("qemu+tcp://h/system")) is None


def test_cli_flag_and_directories_reach_the_settings(tmp_path) -> None:
    from click.testing import CliRunner

    from libvirt_operator.cli import main
    from libvirt_operator.cli.operator_main import settings_from_options
    from libvirt_operator.core.settings import Settings

    assert Settings().allow_test_driver is False  # production default: no test driver
    settings = settings_from_options(allow_test_driver=True, test_driver_dirs=(str(tmp_path / "."),))
    assert settings.allow_test_driver and settings.test_driver_dirs == (str(tmp_path),)
    # what `libvirt-operator dev` writes in test mode passes the operator's policy
    uri = f"test://{tmp_path}/test-host.xml"
    check_policy(parse(uri), insecure=False, allow_test_driver=settings.allow_test_driver,
                 test_driver_dirs=settings.test_driver_dirs)
    result = CliRunner().invoke(main, ["run", "--test-driver-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--test-driver-dir needs --allow-test-driver" in result.output
