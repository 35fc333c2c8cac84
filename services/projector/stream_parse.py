"""The bulk reader's inbound protocol: slice messages out of large socket reads.

Per data message the hot loop does one ``find``, one ``split`` of the frame line, one
``rsplit`` of the reply subject (checked against the consumer's constant
``$JS.ACK.<stream>.<consumer>.1`` head), two ``int()`` calls and four list appends (the
buffer is columnar; see ``ReaderState``).  Everything unusual drops to a slower helper.
"""

from __future__ import annotations

import asyncio

import msgspec
from fleetlog.services.projector.stream_wire import (
    _CRLF,
    _INBOX_SID,
    _MAX_CONTROL_LINE,
    _RECORD_OVERHEAD,
    _SUBJECT_CACHE_MAX,
    ReaderState,
    _ApiError,
    _header_value,
    _ProtocolError,
    _wake,
    log,
)

__all__ = ["InboundMixin"]


class InboundMixin(ReaderState):
    def _on_data(self, gen: int, data: bytes) -> None:
        if gen != self._gen:
            return
        if self._chunks:
            self._chunks.append(data)
            self._chunks_len += len(data)
            if self._chunks_len < self._need:
                return
            buf = b"".join(self._chunks)
            self._chunks.clear()
        else:
            buf = data
        try:
            pos = self._parse(buf)
        except Exception as exc:  # malformed stream or a bug: drop the connection, reconnect
            log.warning("stream reader: protocol error, dropping connection: %r", exc)
            self._last_error = f"protocol error: {exc!r}"
            if self._transport is not None:
                self._transport.abort()
            return
        if gen != self._gen:
            return
        if pos < len(buf):
            rest = buf[pos:]
            if len(rest) > _MAX_CONTROL_LINE and self._need <= len(rest) + 1:
                log.warning("stream reader: unterminated protocol line, dropping connection")
                if self._transport is not None:
                    self._transport.abort()
                return
            self._chunks.append(rest)
            self._chunks_len = len(rest)
        if not self._paused and self._bytes_in - self._bytes_out > self._max_buffer:
            self._paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        w = self._waiter
        if w is not None and (len(self._seqs) >= self._want or self._paused):
            _wake(w)

    def _parse(self, buf: bytes) -> int:
        """Consume complete protocol frames from ``buf``; return the first unconsumed offset.

        This is the hot loop, so it works on locals only.
        """
        find = buf.find
        blen = len(buf)
        pos = 0
        seqs = self._seqs
        add_seq = seqs.append
        add_subj = self._subjs.append
        add_data = self._datas.append
        add_reply = self._replies.append
        add_hdr = self._hdrs.append if self._keep_headers else None
        n_mark = len(seqs)
        pos_mark = 0
        dsid = self._deliver_sid
        ack_head = self._ack_head
        expected = self._expected_cseq
        last = self._last_buffered_seq
        cache = self._subjects
        seen = False
        try:
            while pos < blen:
                eol = find(b"\r\n", pos)
                if eol < 0:
                    self._need = blen - pos + 1
                    break
                op = buf[pos]
                if op == 72:  # b"HMSG "
                    args = buf[pos + 5 : eol].split(b" ")
                    if len(args) == 5:
                        subj, sid, reply, hsize, size = args
                    elif len(args) == 4:
                        subj, sid, hsize, size = args
                        reply = b""
                    else:
                        raise _ProtocolError(f"bad HMSG line {buf[pos:eol]!r}")
                    start = eol + 2
                    hend = start + int(hsize)
                    end = start + int(size)
                elif op == 77 and buf[pos + 1] == 83:  # b"MSG "
                    args = buf[pos + 4 : eol].split(b" ")
                    if len(args) == 4:
                        subj, sid, reply, size = args
                    elif len(args) == 3:
                        subj, sid, size = args
                        reply = b""
                    else:
                        raise _ProtocolError(f"bad MSG line {buf[pos:eol]!r}")
                    start = hend = eol + 2
                    end = start + int(size)
                else:
                    pos = self._control(buf[pos:eol], eol + 2)
                    continue
                if end + 2 > blen:
                    self._need = end + 2 - pos
                    break
                pos = end + 2
                if sid != dsid:
                    self._other_msg(sid, subj, buf[start:hend], buf[hend:end])
                    continue
                seen = True
                try:
                    head, b_sseq, b_cseq, _ts, _pend = reply.rsplit(b".", 4)
                except ValueError:
                    head = b""
                if head == ack_head:
                    sseq = int(b_sseq)
                    cseq = int(b_cseq)
                elif reply.startswith(b"$JS.ACK."):
                    sseq, cseq, _ts, _pend = self._ack_fields(reply)
                    ack_head = self._ack_head
                else:
                    # Status message on the deliver subject: heartbeat or flow control.
                    self._expected_cseq = expected
                    self._last_buffered_seq = last
                    self._account(len(seqs) - n_mark, pos - pos_mark)
                    n_mark = len(seqs)
                    pos_mark = pos
                    self._status(reply, buf[start:hend])
                    dsid = self._deliver_sid
                    expected = self._expected_cseq
                    continue
                if cseq != expected:
                    self._expected_cseq = expected
                    self._last_buffered_seq = last
                    self._reset_consumer(f"consumer sequence gap: got {cseq}, expected {expected}")
                    dsid = None
                    continue
                expected += 1
                if sseq <= last:
                    continue
                last = sseq
                s = cache.get(subj)
                if s is None:
                    if len(cache) >= _SUBJECT_CACHE_MAX:
                        cache.clear()
                    s = cache[subj] = subj.decode("utf-8", "surrogateescape")
                add_seq(sseq)
                add_subj(s)
                add_data(buf[hend:end])
                add_reply(reply)
                if add_hdr is not None:
                    add_hdr(buf[start:hend] if hend > start else None)
        finally:
            # Also on exceptions: records already appended must stay accounted for.
            self._expected_cseq = expected
            self._last_buffered_seq = last
            self._account(len(seqs) - n_mark, pos - pos_mark)
            if seen:
                self._last_activity = asyncio.get_running_loop().time()
        return pos

    def _account(self, nrec: int, nbytes: int) -> None:
        if nrec:
            self._parsed_total += nrec
            self._bytes_in += nbytes + nrec * _RECORD_OVERHEAD
            self._marks.append((self._parsed_total, self._bytes_in))

    def _control(self, line: bytes, nxt: int) -> int:
        """Handle a non-message protocol line; return the offset after it."""
        if line == b"PING":
            self._write(b"PONG\r\n")
        elif line == b"PONG":
            self._pings_out = 0
            if self._hs_pong is not None and not self._hs_pong.done():
                self._hs_pong.set_result(None)
        elif line.startswith(b"INFO "):
            try:
                info = msgspec.json.decode(line[5:])
            except msgspec.DecodeError as exc:
                raise _ProtocolError(f"bad INFO: {exc}") from exc
            if self._hs_info is not None and not self._hs_info.done() and isinstance(info, dict):
                self._hs_info.set_result(info)
        elif line.startswith(b"-ERR"):
            msg = line[4:].strip().strip(b"'").decode("utf-8", "replace")
            self._last_error = f"server error: {msg}"
            log.warning("stream reader: server error: %s", msg)
            if self._hs_pong is not None and not self._hs_pong.done():
                self._hs_pong.set_exception(ConnectionError(msg))
        elif line == b"+OK" or not line:
            pass
        else:
            raise _ProtocolError(f"unexpected protocol line {line[:80]!r}")
        return nxt

    def _other_msg(self, sid: bytes, subj: bytes, hdr: bytes, data: bytes) -> None:
        """Messages not on the live deliver subscription: API replies, or stale deliveries."""
        if sid != _INBOX_SID:
            return  # in-flight deliveries of a consumer we already dropped
        token = subj.rpartition(b".")[2]
        fut = self._requests.pop(token, None)
        if fut is None or fut.done():
            return
        if hdr and hdr[9:12] == b"503":
            fut.set_exception(_ApiError("no responders (JetStream not available)"))
        else:
            fut.set_result(data)

    def _status(self, reply: bytes, hdr: bytes) -> None:
        """Heartbeats and flow-control requests on the deliver subject."""
        code = hdr[9:12]
        if code == b"100":
            if reply:
                # Flow-control request: answer once everything before it is handed out.
                self._fc_pending.append((self._parsed_total, reply))
                self._answer_flow_control()
                return
            # Idle heartbeat.  The server reports what it last delivered to us.
            last_c = _header_value(hdr, b"Nats-Last-Consumer")
            if last_c is not None and int(last_c) != self._expected_cseq - 1:
                self._reset_consumer(
                    f"heartbeat reports last consumer seq {int(last_c)}, have {self._expected_cseq - 1}"
                )
                return
            stalled = _header_value(hdr, b"Nats-Consumer-Stalled")
            if stalled and all(r != stalled for _, r in self._fc_pending):
                self._fc_pending.append((self._parsed_total, stalled))
                self._answer_flow_control()
        else:
            desc = hdr.split(_CRLF, 1)[0].decode("utf-8", "replace")
            self._reset_consumer(f"status on deliver subject: {desc}")

    def _on_lost(self, gen: int, exc: Exception | None) -> None:
        if gen != self._gen:
            return
        was_ready = self._ready_conn
        self._ready_conn = False
        for fut in (self._hs_info, self._hs_pong):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("connection lost during handshake"))
        for rfut in self._requests.values():
            if not rfut.done():
                rfut.set_exception(_ApiError("connection lost during request"))
        self._requests.clear()
        if was_ready and not self._closing:
            # Handshake failures are reported by _run with the server's reason instead.
            self._last_error = f"connection lost: {exc!r}" if exc else "connection closed by server"
            log.info("stream reader: %s", self._last_error)
        self._wakeup.set()
