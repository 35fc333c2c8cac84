"""The bulk reader's inbound protocol: slice messages out of large socket reads.

The socket is read straight into a segment (``_recv_buffer``, asyncio's BufferedProtocol);
per data message the hot loop does one ``find``, one ``split`` of the frame line, one
``rsplit`` of the reply subject (checked against the consumer's constant
``$JS.ACK.<stream>.<consumer>.1`` head), two ``int()`` calls and five list appends (the
buffer is columnar; see ``ReaderState``). The payload is not copied: its span in the
segment is kept, and the hand-out gathers the spans into Arrow.  Everything unusual drops
to a slower helper.
"""

from __future__ import annotations

import asyncio

import msgspec
from fleetlog.services.projector.stream_wire import (
    _CRLF,
    _INBOX_SID,
    _MAX_CONTROL_LINE,
    _MAX_READ,
    _MIN_READ,
    _RECORD_OVERHEAD,
    _SEGMENT_BYTES,
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
    def _recv_buffer(self, gen: int) -> memoryview:
        """Where the socket writes next: the free end of the current segment, with room for at
        least _MIN_READ and for the frame being read. A segment no buffered record is in is
        used again from its start once everything in it is parsed."""
        if gen != self._gen:  # a dropped connection's last read: read into scratch, ignored
            return memoryview(bytearray(_MIN_READ))
        seg = self._seg
        if self._pos == self._fill and not (self._segs and self._segs[-1][0] is seg):
            self._pos = self._fill = 0
        have = self._fill - self._pos
        want = max(_MIN_READ, self._need - have)
        if len(seg) - self._fill < want:
            # The next segment starts with the frame read so far (a partial frame, or nothing).
            size = max(_SEGMENT_BYTES, have + want)
            spare = self._spare
            seg = spare.pop() if spare and len(spare[-1]) >= size else bytearray(size)
            seg[:have] = memoryview(self._seg)[self._pos : self._fill]
            self._seg, self._pos, self._fill = seg, 0, have
        # At most _MAX_READ a read beyond the frame (asyncio's own read size): the buffer's
        # overshoot past max_buffer_bytes stays one read.
        return memoryview(seg)[self._fill : self._fill + max(_MAX_READ, want)]

    def _on_data(self, gen: int, nbytes: int) -> None:
        if gen != self._gen:
            return
        self._fill += nbytes
        if self._fill - self._pos < self._need:
            return
        try:
            pos = self._parse(self._seg, self._pos, self._fill)
        except Exception as exc:  # malformed stream or a bug: drop the connection, reconnect
            log.warning("stream reader: protocol error, dropping connection: %r", exc)
            self._last_error = f"protocol error: {exc!r}"
            if self._transport is not None:
                self._transport.abort()
            return
        if gen != self._gen:
            return
        self._pos = pos
        rest = self._fill - pos
        if rest > _MAX_CONTROL_LINE and self._need <= rest + 1:
            log.warning("stream reader: unterminated protocol line, dropping connection")
            if self._transport is not None:
                self._transport.abort()
            return
        if not self._paused and self._bytes_in - self._bytes_out > self._max_buffer:
            self._paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        w = self._waiter
        if w is not None and (len(self._seqs) >= self._want or self._paused):
            _wake(w)

    def _parse(self, buf: bytearray, pos: int, blen: int) -> int:
        """Consume complete protocol frames from ``buf[pos:blen]``; return the first unconsumed
        offset. A payload stays where it is: its (start, end) goes to ``_spans``.

        This is the hot loop, so it works on locals only.
        """
        find = buf.find
        # The frame lines are copied out as `bytes` through a memoryview (one allocation each):
        # split and rsplit of a bytearray slice make bytearrays, two allocations apiece.
        view = memoryview(buf)
        seqs = self._seqs
        add_seq = seqs.append
        add_subj = self._subjs.append
        add_span = self._spans.append
        add_reply = self._replies.append
        add_hdr = self._hdrs.append if self._keep_headers else None
        n_first = n_mark = len(seqs)
        pos_mark = pos
        dsid = self._deliver_sid
        ack_head = self._ack_head
        expected = self._expected_cseq
        last = self._last_buffered_seq
        cache = self._subjects
        seen = False
        # Set again below if a frame is cut short; a frame that completed needs nothing more
        # (a stale `_need` of a 600 KB frame held every later small frame back: the reader
        # stalled until that much more arrived).
        self._need = 0
        try:
            while pos < blen:
                eol = find(b"\r\n", pos, blen)
                if eol < 0:
                    self._need = blen - pos + 1
                    break
                op = buf[pos]
                if op == 72:  # b"HMSG "
                    args = bytes(view[pos + 5 : eol]).split(b" ")
                    if len(args) == 5:
                        subj, sid, reply, hsize, size = args
                    elif len(args) == 4:
                        subj, sid, hsize, size = args
                        reply = b""
                    else:
                        raise _ProtocolError(f"bad HMSG line {bytes(buf[pos:eol])!r}")
                    start = eol + 2
                    hend = start + int(hsize)
                    end = start + int(size)
                elif op == 77 and buf[pos + 1] == 83:  # b"MSG "
                    args = bytes(view[pos + 4 : eol]).split(b" ")
                    if len(args) == 4:
                        subj, sid, reply, size = args
                    elif len(args) == 3:
                        subj, sid, size = args
                        reply = b""
                    else:
                        raise _ProtocolError(f"bad MSG line {bytes(buf[pos:eol])!r}")
                    start = hend = eol + 2
                    end = start + int(size)
                else:
                    pos = self._control(bytes(view[pos:eol]), eol + 2)
                    continue
                if end + 2 > blen:
                    self._need = end + 2 - pos
                    break
                pos = end + 2
                if sid != dsid:
                    self._other_msg(sid, subj, bytes(view[start:hend]), bytes(view[hend:end]))
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
                    self._status(reply, bytes(view[start:hend]))
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
                add_span(hend)
                add_span(end)
                add_reply(reply)
                if add_hdr is not None:
                    add_hdr(bytes(view[start:hend]) if hend > start else None)
        finally:
            # Also on exceptions: records already appended must stay accounted for, and their
            # segment kept while they are buffered.
            self._expected_cseq = expected
            self._last_buffered_seq = last
            self._account(len(seqs) - n_mark, pos - pos_mark)
            added = len(seqs) - n_first
            if added:
                segs = self._segs
                if segs and segs[-1][0] is buf:
                    segs[-1][1] += added
                else:
                    segs.append([buf, added])
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
