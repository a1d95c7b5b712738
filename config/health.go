package config

import (
	"regexp"
	"time"

	"github.com/BurntSushi/toml"
)

// HealthKind names how backends are checked.
type HealthKind string

const (
	// HealthNone does not probe: every backend counts as healthy.
	HealthNone HealthKind = "none"
	// HealthTCP opens a TCP connection to the backend and closes it.
	HealthTCP HealthKind = "tcp"
	// HealthSendExpect sends Health.Send and checks the reply, over TCP for
	// a TCP service and over UDP for a UDP service.
	HealthSendExpect HealthKind = "send_expect"
)

// PanicMode says where new connections go when no backend is healthy.
type PanicMode string

const (
	// PanicNone closes new connections at once.
	PanicNone PanicMode = "none"
	// PanicAll routes to every configured backend with weight > 0, as if
	// all were healthy.
	PanicAll PanicMode = "all"
)

// OnDown says what happens to the open connections of a backend that the
// active health checks mark down (passive_fall alone closes nothing).
type OnDown string

const (
	// OnDownKeep leaves them open.
	OnDownKeep OnDown = "keep"
	// OnDownClose closes them, so that clients of a failed primary
	// reconnect (to another backend) instead of hanging on.
	OnDownClose OnDown = "close"
)

// OnFailback says what happens to the connections open on a service's
// backups when its route moves from them back to its primaries.
type OnFailback string

const (
	// OnFailbackKeep leaves them open, as HAProxy does by default.
	OnFailbackKeep OnFailback = "keep"
	// OnFailbackClose closes them, as HAProxy's on-marked-up
	// shutdown-backup-sessions: clients of a database standby reconnect
	// to the primary instead of writing to both.
	OnFailbackClose OnFailback = "close"
)

// Health is the [services.NAME.health] table.
type Health struct {
	// Kind is HealthNone when the service has no health table.
	Kind HealthKind
	// Interval is the time between the starts of two probes of a backend;
	// Timeout bounds one probe (connect, send and reply) and is at most
	// Interval. Both are zero for HealthNone.
	Interval, Timeout time.Duration
	// Rise and Fall are the consecutive successes and failures that move a
	// backend up and down.
	Rise, Fall int
	// Send, Expect and ExpectRegex are for HealthSendExpect only. Send may
	// be empty (a banner check) on a TCP service, not on a UDP one; exactly
	// one of Expect and ExpectRegex is set, and ExpectRegex compiles.
	Send        string
	Expect      string
	ExpectRegex string
	// Port is where probes go; 0 means the backend's own port.
	Port uint16
}

// MinHealthInterval keeps a typo such as "1us" from turning the prober into
// a busy loop.
const MinHealthInterval = 10 * time.Millisecond

// MaxRiseFall bounds rise, fall and passive_fall: past 100 consecutive
// results a check no longer decides anything in useful time.
const MaxRiseFall = 100

// fileServiceHealth holds the health keys of [services.NAME]; fileService
// embeds it.
type fileServiceHealth struct {
	Health      toml.Primitive `toml:"health"`
	PassiveFall any            `toml:"passive_fall"`
	PanicMode   any            `toml:"panic_mode"`
	OnDown      any            `toml:"on_down"`
	OnFailback  any            `toml:"on_failback"`
	// health is Health decoded (validator.service), nil without a
	// [health] table or with something other than a table there.
	health *fileHealth
}

// fileHealth is the TOML shape of [services.NAME.health].
type fileHealth struct {
	Kind        any `toml:"kind"`
	Interval    any `toml:"interval"`
	Timeout     any `toml:"timeout"`
	Rise        any `toml:"rise"`
	Fall        any `toml:"fall"`
	Send        any `toml:"send"`
	Expect      any `toml:"expect"`
	ExpectRegex any `toml:"expect_regex"`
	Port        any `toml:"port"`
}

// serviceHealth fills the health settings of svc: its [health] table and
// the passive_fall, panic_mode, on_down and on_failback keys.
func (v *validator) serviceHealth(at string, f *fileService, svc *Service) {
	svc.Health = v.health(at+".health", f.health)
	if svc.Protocol == UDP && f.health != nil && f.health.Kind == nil {
		// The TCP default would probe a port a UDP server need not listen
		// on, and mark every backend down: make the operator choose.
		v.add(at+".health.kind", "a UDP service has no default check kind: set \"send_expect\" (a request and reply over UDP) or \"tcp\" (a TCP connect, with port = the backend's TCP port), or \"none\"")
	}
	if svc.Protocol == UDP && svc.Health.Kind == HealthSendExpect && svc.Health.Send == "" {
		// No banner over UDP: a server answers only a datagram it got, so
		// every probe would time out and every backend go down.
		if f.health == nil || f.health.Send == nil {
			v.add(at+".health.send", "missing: a UDP send_expect check must send a request (a UDP server answers only a datagram it receives, so without one every probe would time out)")
		} else if s, ok := f.health.Send.(string); ok && s == "" {
			v.add(at+".health.send", "must not be empty for a UDP service: a UDP server answers only a datagram it receives, so every probe would time out")
		} // else not a string: reported already
	}
	svc.PanicMode = PanicMode(v.enum(at+".panic_mode", f.PanicMode, string(DefaultPanicMode), "none", "all"))
	svc.OnDown = OnDown(v.enum(at+".on_down", f.OnDown, string(DefaultOnDown), "keep", "close"))
	svc.OnFailback = OnFailback(v.enum(at+".on_failback", f.OnFailback, string(DefaultOnFailback), "keep", "close"))
	if svc.Protocol == UDP {
		// Passive detection counts failed connects, and a UDP flow has
		// none: the key would do nothing, and the default is off.
		v.only(TCP, at+".passive_fall", f.PassiveFall, svc.Protocol, ": it counts failed connects, which UDP has none of; the active checks alone judge UDP backends")
		return
	}
	svc.PassiveFall = int(v.integer(at+".passive_fall", f.PassiveFall, DefaultPassiveFall, 0, MaxRiseFall))
	if svc.Health.Kind == HealthNone {
		// Passive detection marks a backend down until the active check
		// brings it back: without one, it would stay down for good.
		if f.PassiveFall != nil && svc.PassiveFall > 0 {
			v.add(at+".passive_fall", "needs an active health check to bring backends back: set [%s.health] kind = \"tcp\" or \"send_expect\", or passive_fall = 0", at)
		}
		svc.PassiveFall = 0
	}
}

// keyValue is a key of a table with its raw value, for checks that walk
// several keys in the order of the file's documentation.
type keyValue struct {
	key string
	raw any
}

func (v *validator) health(at string, f *fileHealth) Health {
	if f == nil {
		return Health{Kind: HealthNone}
	}
	h := Health{Kind: HealthKind(v.enum(at+".kind", f.Kind, string(DefaultHealthKind), "none", "tcp", "send_expect"))}
	if h.Kind == HealthNone {
		for _, k := range []keyValue{
			{"interval", f.Interval}, {"timeout", f.Timeout}, {"rise", f.Rise}, {"fall", f.Fall}, {"send", f.Send},
			{"expect", f.Expect}, {"expect_regex", f.ExpectRegex}, {"port", f.Port},
		} {
			if k.raw != nil {
				v.add(at+"."+k.key, "applies only to kind = \"tcp\" or \"send_expect\" (kind is \"none\")")
			}
		}
		return h
	}

	h.Interval = v.duration(at+".interval", f.Interval, DefaultHealthInterval, false)
	if h.Interval < MinHealthInterval {
		v.add(at+".interval", "%s is too short: use at least %s", h.Interval, MinHealthInterval)
		h.Interval = DefaultHealthInterval
	}
	h.Timeout = v.duration(at+".timeout", f.Timeout, min(DefaultHealthTimeout, h.Interval), false)
	if h.Timeout > h.Interval {
		v.add(at+".timeout", "%s is longer than interval (%s): a probe must end before the next one is due", h.Timeout, h.Interval)
	}
	h.Rise = int(v.integer(at+".rise", f.Rise, DefaultHealthRise, 1, MaxRiseFall))
	h.Fall = int(v.integer(at+".fall", f.Fall, DefaultHealthFall, 1, MaxRiseFall))
	h.Port = uint16(v.integer(at+".port", f.Port, 0, 0, 65535))

	if h.Kind != HealthSendExpect {
		for _, k := range []keyValue{{"send", f.Send}, {"expect", f.Expect}, {"expect_regex", f.ExpectRegex}} {
			if k.raw != nil {
				v.add(at+"."+k.key, "applies only to kind = \"send_expect\" (kind is %q)", h.Kind)
			}
		}
		return h
	}
	if f.Send != nil {
		h.Send, _ = v.str(at+".send", f.Send)
	}
	if f.Expect != nil {
		if s, ok := v.str(at+".expect", f.Expect); ok && s == "" {
			v.add(at+".expect", "must not be empty: every reply starts with \"\"")
		} else {
			h.Expect = s
		}
	}
	if f.ExpectRegex != nil {
		if s, ok := v.str(at+".expect_regex", f.ExpectRegex); ok {
			if _, err := regexp.Compile(s); err != nil {
				v.add(at+".expect_regex", "%v", err)
			} else if s == "" {
				v.add(at+".expect_regex", "must not be empty: it would match every reply")
			} else {
				h.ExpectRegex = s
			}
		}
	}
	switch {
	case f.Expect != nil && f.ExpectRegex != nil:
		v.add(at+".expect_regex", "set expect or expect_regex, not both")
	case f.Expect == nil && f.ExpectRegex == nil:
		v.add(at+".expect", "missing: kind = \"send_expect\" needs expect (a prefix of the reply) or expect_regex")
	}
	return h
}
