package health

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
	"syscall"
	"time"
)

// Kind is what a probe does.
type Kind string

const (
	// Connect opens a TCP connection and closes it.
	Connect Kind = "tcp"
	// SendExpect sends Spec.Send and checks that the reply starts with
	// Spec.Expect or matches Spec.ExpectRegex, over TCP or UDP.
	SendExpect Kind = "send_expect"
)

// Spec is how one backend is checked. It is comparable, so that the Checker
// can tell whether a new Set changes a running prober.
type Spec struct {
	Kind Kind
	// Network is "tcp" or "udp"; it matters only for SendExpect (Connect is
	// always TCP).
	Network  string
	Interval time.Duration
	// Timeout bounds one whole probe: connect, send and reply.
	Timeout time.Duration
	// Rise and Fall are the consecutive successes and failures that move a
	// backend up and down (see Next).
	Rise, Fall int
	// Send is written as is once connected; it may be empty (a banner check).
	Send string
	// ProxyHeader, when not empty, goes first: on a TCP probe's connection
	// right after connect (a Connect probe then closes), and at the start of
	// every UDP probe datagram, before Send. It is the PROXY protocol header
	// that a backend behind proxy_protocol requires before anything else;
	// the package sends it as is, without reading it.
	ProxyHeader string
	// Exactly one of Expect and ExpectRegex is set for SendExpect.
	Expect      string
	ExpectRegex string
}

// Prober checks one backend once. Probe returns nil when the backend is
// healthy and otherwise an error that says what failed; ctx carries the
// probe's deadline.
type Prober interface {
	Probe(ctx context.Context, addr netip.AddrPort) error
}

var (
	_ Prober = (*connectProber)(nil)
	_ Prober = (*sendExpectProber)(nil)
)

// maxReply is how much of a reply a send_expect probe reads, and so the
// size of its buffer: 4 KiB holds any banner or status line a check should
// look at, and a UDP reply longer than that is cut (the prefix or regex
// only sees its first 4 KiB).
const maxReply = 4096

// dialFunc opens a probe's connection: net.Dialer.DialContext, or a
// stand-in in tests.
type dialFunc func(ctx context.Context, network, address string) (net.Conn, error)

// NewProber returns the prober spec describes. It fails on an unknown kind
// or network, a send_expect spec without an expectation, or a bad regexp.
func NewProber(spec Spec) (Prober, error) {
	return newProber(spec, (&net.Dialer{}).DialContext)
}

// newProber is NewProber with the dial function its probes use.
func newProber(spec Spec, dial dialFunc) (Prober, error) {
	switch spec.Kind {
	case Connect:
		return &connectProber{dial: dial, header: []byte(spec.ProxyHeader)}, nil
	case SendExpect:
		if spec.Network != "tcp" && spec.Network != "udp" {
			return nil, fmt.Errorf("send_expect over %q: want tcp or udp", spec.Network)
		}
		// One write, so that a UDP probe is one datagram and a TCP one
		// sends the header and the request in one segment.
		p := &sendExpectProber{dial: dial, network: spec.Network, send: []byte(spec.ProxyHeader + spec.Send), expect: []byte(spec.Expect)}
		switch {
		case spec.Expect != "" && spec.ExpectRegex != "":
			return nil, errors.New("send_expect: set expect or expect_regex, not both")
		case spec.ExpectRegex != "":
			re, err := regexp.Compile(spec.ExpectRegex)
			if err != nil {
				return nil, fmt.Errorf("send_expect: expect_regex: %w", err)
			}
			p.re = re
		case spec.Expect == "":
			return nil, errors.New("send_expect: expect or expect_regex is required")
		}
		return p, nil
	}
	return nil, fmt.Errorf("unknown health check kind %q", spec.Kind)
}

// connectProber passes when a TCP connection can be opened (and, with a
// PROXY header to send, the header written).
type connectProber struct {
	dial   dialFunc
	header []byte // sent once connected, then the connection closes; may be nil
}

func (p *connectProber) Probe(ctx context.Context, addr netip.AddrPort) error {
	c, err := p.dial(ctx, "tcp", addr.String())
	if err != nil {
		return describe("connect", ctx, err)
	}
	defer c.Close()
	if len(p.header) > 0 {
		// A backend that requires the header logs a connection closed
		// without one as a broken client: send it, as HAProxy's checks do.
		defer bound(ctx, c)()
		if _, err := c.Write(p.header); err != nil {
			return describe("send PROXY header", ctx, err)
		}
	}
	return nil
}

// bound makes ctx's deadline c's, and cancelling ctx (the checker
// closing) cut c's reads and writes short; the returned func undoes the
// latter.
func bound(ctx context.Context, c net.Conn) (stop func() bool) {
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	return context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
}

// sendExpectProber sends a request and checks the reply.
type sendExpectProber struct {
	dial    dialFunc
	network string
	send    []byte         // Spec.ProxyHeader and Spec.Send
	expect  []byte         // the reply must start with it; nil when re is set
	re      *regexp.Regexp // the reply (its first maxReply bytes) must match
}

func (p *sendExpectProber) Probe(ctx context.Context, addr netip.AddrPort) error {
	c, err := p.dial(ctx, p.network, addr.String())
	if err != nil {
		return describe("connect", ctx, err)
	}
	defer c.Close()
	defer bound(ctx, c)()

	if len(p.send) > 0 {
		if _, err := c.Write(p.send); err != nil {
			return describe("send", ctx, err)
		}
	}
	buf := make([]byte, maxReply)
	if p.network == "udp" {
		// One datagram is the whole reply. An ICMP port unreachable from the
		// send shows up here as "connection refused".
		n, err := c.Read(buf)
		if err != nil {
			return describe("read reply", ctx, err)
		}
		if done, err := p.match(buf[:n]); done {
			return err
		}
		return p.mismatch(buf[:n])
	}
	n := 0
	for {
		m, err := c.Read(buf[n:])
		n += m
		if done, merr := p.match(buf[:n]); done {
			return merr
		}
		if n == len(buf) {
			return fmt.Errorf("first %d bytes of the reply do not match %s", n, p.want())
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errClosedEarly
			}
			if n == 0 {
				return describe("read reply", ctx, err)
			}
			return fmt.Errorf("reply %q does not match %s: %w", buf[:n], p.want(), describe("read reply", ctx, err))
		}
	}
}

// errClosedEarly is a reply that ended before it could match.
var errClosedEarly = errors.New("connection closed by the backend")

// match decides on the reply read so far: done is false while more bytes
// could still make it match; once done, err is nil for a match.
func (p *sendExpectProber) match(reply []byte) (done bool, err error) {
	if p.re != nil {
		if p.re.Match(reply) {
			return true, nil
		}
		return false, nil
	}
	if len(reply) >= len(p.expect) {
		if bytes.HasPrefix(reply, p.expect) {
			return true, nil
		}
		return true, fmt.Errorf("reply %q does not start with %q", reply[:min(len(reply), len(p.expect)+16)], p.expect)
	}
	if !bytes.HasPrefix(p.expect, reply) {
		return true, fmt.Errorf("reply %q does not start with %q", reply, p.expect)
	}
	return false, nil
}

// mismatch is the error for a complete reply that did not match.
func (p *sendExpectProber) mismatch(reply []byte) error {
	if p.re != nil {
		return fmt.Errorf("reply %q does not match %s", reply, p.want())
	}
	return fmt.Errorf("reply %q does not start with %q", reply, p.expect)
}

func (p *sendExpectProber) want() string {
	if p.re != nil {
		return fmt.Sprintf("expect_regex %q", p.re)
	}
	return fmt.Sprintf("expect %q", p.expect)
}

// LocalShortage reports an error of opening a socket to a backend that
// says this host, not the backend, ran short of something: descriptors
// (EMFILE, ENFILE), buffers or memory (ENOBUFS, ENOMEM), epoll watches
// (ENOSPC), or a free local port (EADDRNOTAVAIL toward a TCP backend;
// EAGAIN from a UDP socket's connect, which binds a port of its own
// first). A probe that failed so says nothing about the backend: counting
// it would mark healthy backends down, all of them at once when
// descriptors run out, and one busy backend after another as ports run
// out toward each. The data path classifies its connects with it too
// (l4's isLocalShortage and blamesBackend).
func LocalShortage(err error) bool {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ENOSPC, syscall.EADDRNOTAVAIL, syscall.EAGAIN} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// describe wraps err with the step that failed, and says "timed out" for
// the probe's own deadline rather than the runtime's i/o timeout wording.
func describe(step string, ctx context.Context, err error) error {
	if errors.Is(ctx.Err(), context.Canceled) {
		// Cancelling sets a past deadline, so this comes first.
		return fmt.Errorf("%s: %w", step, context.Canceled)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: timed out: %w", step, os.ErrDeadlineExceeded)
	}
	return fmt.Errorf("%s: %w", step, err)
}
