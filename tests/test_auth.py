"""The deployment secret and the HMAC handshake (matrixinfer/auth.py): peers with the same secret
authenticate each other, any other peer fails with AuthError, and recorded proofs cannot be replayed."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from matrixinfer import auth
from matrixinfer.netio import FRAMING

SECRET = b"s" * 32


def _pair(server_secret: bytes, client: object, purpose: str = "kv") -> tuple[BaseException | None, object]:
    """Run the server side on one end of a socket pair and ``client(sock)`` on the other; the server's
    exception (or None) and the client's result or exception."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    server_error: list[BaseException | None] = [None]

    def serve() -> None:
        try:
            auth.server_handshake(a, server_secret, purpose, "test client")
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            server_error[0] = exc
        finally:
            a.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        result: object = client(b)  # type: ignore[operator]
    except BaseException as exc:  # noqa: BLE001
        result = exc
    finally:
        b.close()
    t.join(10)
    return server_error[0], result


def test_same_secret_authenticates_both_ways():
    err, result = _pair(SECRET, lambda s: auth.client_handshake(s, SECRET, "kv"))
    assert err is None and result is None


def test_another_secret_fails_on_both_sides():
    err, result = _pair(SECRET, lambda s: auth.client_handshake(s, b"t" * 32, "kv"))
    assert isinstance(result, auth.AuthError) and "another deployment secret" in str(result)
    assert isinstance(err, (auth.AuthError, OSError))  # the client hung up without a proof


def test_a_proof_for_one_port_is_worthless_on_another():
    err, result = _pair(SECRET, lambda s: auth.client_handshake(s, SECRET, "control"), purpose="kv")
    assert isinstance(result, auth.AuthError)


def test_a_peer_without_the_handshake_is_refused_with_a_clear_error():
    def plain_client(s: socket.socket) -> None:
        s.sendall(FRAMING.encode({"type": "Join", "role": "decode", "instance_id": "x"}))
        return None

    err, _ = _pair(SECRET, plain_client)
    assert isinstance(err, auth.AuthError) and "without authentication" in str(err)


def test_a_server_without_the_handshake_is_reported_to_the_client():
    a, b = socket.socketpair()
    b.settimeout(5)
    a.sendall(FRAMING.encode({"type": "Welcome"}) + bytes(100))  # a server that talks first, in frames
    with pytest.raises(auth.AuthError, match="does not speak the authentication handshake"):
        auth.client_handshake(b, SECRET, "control")
    a.close()
    b.close()


def test_a_recorded_client_proof_cannot_be_replayed():
    recorded: list[bytes] = []

    class Recorded:  # a genuine client's socket, whose bytes an eavesdropper records
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def sendall(self, data: bytes) -> None:
            recorded.append(bytes(data))
            self.sock.sendall(data)

        def recv_into(self, *args: object) -> int:
            return self.sock.recv_into(*args)  # type: ignore[arg-type]

    def record(s: socket.socket) -> None:
        auth.client_handshake(Recorded(s), SECRET, "kv")  # type: ignore[arg-type]

    err, result = _pair(SECRET, record)
    assert err is None and result is None and len(recorded) == 2

    def replay(s: socket.socket) -> None:  # the eavesdropper, without the secret, sends the same bytes
        s.sendall(recorded[0])
        s.recv(4 + auth.NONCE + auth.MAC, socket.MSG_WAITALL)
        s.sendall(recorded[1])

    err, _ = _pair(SECRET, replay)
    assert isinstance(err, auth.AuthError) and "wrong proof" in str(err)


def test_secret_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.ENV_SECRET, raising=False)
    monkeypatch.delenv(auth.ENV_SECRET_FILE, raising=False)
    assert auth.load_secret() is None
    path = auth.write_secret_file(auth.generate_secret(), str(tmp_path))
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(path.parent).st_mode & 0o777 == 0o700
    secret = auth.read_secret_file(path)
    assert len(secret) == 64
    monkeypatch.setenv(auth.ENV_SECRET_FILE, str(path))
    assert auth.load_secret() == secret
    monkeypatch.setenv(auth.ENV_SECRET, "e" * 20)
    assert auth.load_secret() == b"e" * 20  # the variable before the file it names
    assert auth.load_secret(str(path)) == secret  # an explicit file before both
    monkeypatch.setenv(auth.ENV_SECRET, "short")
    with pytest.raises(ValueError, match="at least 16"):
        auth.load_secret()
    shared = tmp_path / "shared"
    shared.write_text("x" * 32)
    shared.chmod(0o644)
    with pytest.raises(ValueError, match="readable by other users"):
        auth.read_secret_file(shared)
