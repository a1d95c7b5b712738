package config

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// Defaults. They live here and nowhere else; the README's config reference
// lists the same values.
const (
	DefaultAdminListen    = "127.0.0.1:9901"
	DefaultReloadWatch    = false
	DefaultProtocol       = TCP
	DefaultBalance        = Maglev
	DefaultHashKey        = SourceIP
	DefaultWorkers        = 0 // one per core
	DefaultConnectTimeout = 3 * time.Second
	DefaultIdleTimeout    = time.Hour
	// DefaultUDPIdleTimeout is idle_timeout for UDP services: a UDP flow
	// has no end of its own, so the timeout is what ends it. A minute
	// outlasts the pauses of game clients (menus, loading screens) while
	// freeing the flows of clients that left within a minute.
	DefaultUDPIdleTimeout = 60 * time.Second
	// DefaultMaxFlows caps a UDP service's open flows. Each flow holds a
	// socket (a descriptor and a local port toward its backend) and a
	// goroutine; 65536 fits the default ephemeral port range of a few
	// backend addresses.
	DefaultMaxFlows     = 65536
	DefaultDrainTimeout = 30 * time.Second
	DefaultWeight       = 100
	DefaultBackup       = false

	// Health checks (health.go). Without a [health] table a service does
	// not probe; with one, kind defaults to a TCP connect.
	DefaultHealthKind     = HealthTCP
	DefaultHealthInterval = 2 * time.Second
	DefaultHealthTimeout  = time.Second // or interval, when that is shorter
	DefaultHealthRise     = 2
	DefaultHealthFall     = 3
	DefaultPassiveFall    = 3
	DefaultPanicMode      = PanicNone
	DefaultOnDown         = OnDownKeep
	DefaultOnFailback     = OnFailbackKeep

	// MaxWeight bounds weights so that round-robin sequences and Maglev
	// credit arithmetic stay small; 0..1000 gives operators three digits of
	// precision, more than HAProxy's 0..256.
	MaxWeight = 1000
	// MaxWorkers bounds SO_REUSEPORT sockets per service; more than a few per
	// core only costs memory.
	MaxWorkers = 1024
	// MaxMaxFlows bounds max_flows: 16 Mi flows would need as many
	// descriptors, far beyond any sane RLIMIT_NOFILE.
	MaxMaxFlows = 1 << 24
	// MaxRepliesPerDatagram bounds replies_per_datagram: protocols that
	// answer with more than a few datagrams are streams, for idle_timeout.
	MaxRepliesPerDatagram = 1000
)

// Errors is every problem found in one config file. Load returns it (as
// error) whenever the file is rejected.
type Errors struct {
	Path     string
	Problems []Problem
}

// Problem is one error in a config file. Exactly one of Key or Line is set:
// Key (dotted, with 0-based indexes: services.pg.backends[2].address) for a
// bad value, Line and Col for a syntax error.
type Problem struct {
	Key       string
	Line, Col int
	Message   string
	// Context is the offending line with a caret under the error, for syntax
	// errors only; the check command prints it.
	Context string
}

func (p Problem) String() string {
	if p.Key != "" {
		return p.Key + ": " + p.Message
	}
	return fmt.Sprintf("%d:%d: %s", p.Line, p.Col, p.Message)
}

func (e *Errors) Error() string {
	var b strings.Builder
	for i, p := range e.Problems {
		if i > 0 {
			b.WriteByte('\n')
		}
		name := e.Path
		if name == "" {
			name = "config"
		}
		b.WriteString(name)
		if p.Key != "" {
			b.WriteString(": ")
		} else {
			b.WriteByte(':')
		}
		b.WriteString(p.String())
	}
	return b.String()
}

// Load reads and compiles the config file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(data, path)
}

// The TOML-shaped file. Leaves are `any` so that a value of the wrong type
// does not abort decoding: every leaf is checked by the validator, which can
// then report all problems at once with their dotted keys. Tables are
// toml.Primitive for the same reason: a scalar where a table belongs (`health
// = "tcp"`) would otherwise fail the whole decode; the validator checks each
// one's type before decoding it (validator.table).
type fileConfig struct {
	Admin    toml.Primitive            `toml:"admin"`
	Reload   toml.Primitive            `toml:"reload"`
	Log      toml.Primitive            `toml:"log"`
	Process  toml.Primitive            `toml:"process"`
	Services map[string]toml.Primitive `toml:"services"`
}

type fileAdmin struct {
	Listen any `toml:"listen"`
}

type fileReload struct {
	Watch any `toml:"watch"`
}

type fileService struct {
	Listen         any `toml:"listen"`
	Protocol       any `toml:"protocol"`
	Balance        any `toml:"balance"`
	HashKey        any `toml:"hash_key"`
	Workers        any `toml:"workers"`
	ConnectTimeout any `toml:"connect_timeout"`
	IdleTimeout    any `toml:"idle_timeout"`
	DrainTimeout   any `toml:"drain_timeout"`
	MaxFlows       any `toml:"max_flows"`
	// RepliesPerDatagram: see Service.RepliesPerDatagram.
	RepliesPerDatagram any `toml:"replies_per_datagram"`
	fileServiceHealth
	fileServiceProtect
	// Backends are decoded as plain values so that unknown keys can be
	// reported with the backend's index, which MetaData.Undecoded cannot do
	// for arrays of tables, and so that `backends = ["10.0.0.1:5432"]` (a
	// list of addresses, as in HAProxy and nginx) is reported as such
	// (validator.backendTables).
	Backends any `toml:"backends"`
}

var backendKeys = []string{"address", "weight", "max_connections", "backup"}

var serviceName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// Parse compiles a config from the bytes of a file; path is used in errors.
func Parse(data []byte, path string) (*Config, error) {
	var file fileConfig
	md, err := toml.Decode(string(data), &file)
	if err != nil {
		return nil, &Errors{Path: path, Problems: []Problem{decodeProblem(data, err)}}
	}
	v := validator{md: md}
	sum := sha256.Sum256(data)
	cfg := &Config{Path: path, Hash: hex.EncodeToString(sum[:])}
	var admin *fileAdmin
	if a := new(fileAdmin); v.table(file.Admin, a, "admin") {
		admin = a
	}
	cfg.Admin = v.admin(admin)
	var log *fileLog
	if l := new(fileLog); v.table(file.Log, l, "log") {
		log = l
	}
	cfg.Log = v.log(log)
	var process *fileProcess
	if p := new(fileProcess); v.table(file.Process, p, "process") {
		process = p
	}
	cfg.Process = v.process(process)
	if r := new(fileReload); v.table(file.Reload, r, "reload") {
		cfg.Reload.Watch = v.boolean("reload.watch", r.Watch, DefaultReloadWatch)
	}
	if t := md.Type("services"); t != "" && t != "Hash" {
		// The decoder skips a non-table here without an error of its own.
		v.add("services", "want [services.NAME] tables, got %s", tomlTypeName(t))
	} else if len(file.Services) == 0 {
		v.add("services", "no services defined: add at least one [services.NAME] table")
	}
	names := make([]string, 0, len(file.Services))
	for name := range file.Services {
		names = append(names, name)
	}
	sort.Strings(names)
	// Overlapping listen addresses are checked over every service whose
	// address parsed, valid or not otherwise: each problem is reported in
	// the first run, not the next one after the others are fixed.
	var listening []Service
	for _, name := range names {
		f := new(fileService)
		if !v.table(file.Services[name], f, "services", name) {
			continue
		}
		svc, ok := v.service(name, f)
		if ok {
			cfg.Services = append(cfg.Services, svc)
		}
		// A protocol that did not parse reads as the default: checked
		// against the others, it could report a clash that is not one.
		if svc.Listen.IsValid() && (f.Protocol == nil || f.Protocol == "tcp" || f.Protocol == "udp") {
			listening = append(listening, svc)
		}
	}
	v.checkListenConflicts(listening)
	v.checkAdminConflict(cfg.Admin.Listen, admin == nil || admin.Listen == nil, listening)
	// Last: the keys of a table count as decoded only once the table has
	// been (validator.table).
	for _, key := range md.Undecoded() {
		if len(key) > 3 && key[0] == "services" && key[2] == "backends" {
			continue // checked by service, with the backend's index
		}
		v.add(key.String(), "unknown key")
	}
	if len(v.problems) > 0 {
		return nil, &Errors{Path: path, Problems: v.problems}
	}
	return cfg, nil
}

func decodeProblem(data []byte, err error) Problem {
	var pe toml.ParseError
	if !errors.As(err, &pe) {
		return Problem{Line: 1, Col: 1, Message: err.Error()}
	}
	// Position.Line is off by one when the offending byte is a newline, so
	// line and column are derived from the byte offset instead.
	start := min(max(pe.Position.Start, 0), len(data))
	lineStart := bytes.LastIndexByte(data[:start], '\n') + 1
	lineEnd := bytes.IndexByte(data[lineStart:], '\n')
	if lineEnd < 0 {
		lineEnd = len(data) - lineStart
	}
	line := bytes.Count(data[:start], []byte{'\n'}) + 1
	col := start - lineStart + 1
	msg := pe.Message
	if pe.LastKey != "" && !strings.Contains(msg, pe.LastKey) {
		msg = fmt.Sprintf("%s (after key %s)", msg, pe.LastKey)
	}
	text := string(data[lineStart : lineStart+lineEnd])
	context := fmt.Sprintf("%6d | %s\n%6s | %s^", line, text, "", strings.Repeat(" ", col-1))
	return Problem{Line: line, Col: col, Message: msg, Context: context}
}

// validator collects problems while it converts file values to Config values.
type validator struct {
	md       toml.MetaData
	problems []Problem
}

// table decodes the table at key (its parts, as the file nests them) from p
// into dst. It returns false when key is absent, and when it holds
// something other than a table, which it reports under the dotted key.
func (v *validator) table(p toml.Primitive, dst any, key ...string) bool {
	// The value's type is read from the value, not from MetaData.Type:
	// the decoder matches struct fields regardless of case, so the file
	// may spell the key otherwise than key does. Decoding into `any`
	// leaves the keys within undecoded, for Undecoded to check.
	if reflect.ValueOf(p).IsZero() {
		return false // absent: PrimitiveDecode would panic on it
	}
	var raw any
	if err := v.md.PrimitiveDecode(p, &raw); err != nil || raw == nil {
		return false
	}
	dotted := strings.Join(key, ".")
	if _, ok := raw.(map[string]any); !ok {
		v.add(dotted, "want a table ([%s] with its keys on the lines below it), got %s", dotted, tomlType(raw))
		return false
	}
	if err := v.md.PrimitiveDecode(p, dst); err != nil {
		// Not expected: every leaf of dst is `any`.
		v.add(dotted, "%v", err)
		return false
	}
	return true
}

// only reports a key set (raw not nil) on a service whose protocol is not
// want, with why appended to the message, and returns false then.
func (v *validator) only(want Protocol, key string, raw any, protocol Protocol, why string) bool {
	if raw != nil && protocol != want {
		v.add(key, "applies only to protocol = %q (protocol is %q)%s", want, protocol, why)
		return false
	}
	return true
}

func (v *validator) add(key, format string, args ...any) {
	v.problems = append(v.problems, Problem{Key: key, Message: fmt.Sprintf(format, args...)})
}

func (v *validator) admin(a *fileAdmin) Admin {
	if a == nil || a.Listen == nil {
		return Admin{Listen: DefaultAdminListen}
	}
	s, ok := v.str("admin.listen", a.Listen)
	if !ok || s == "" {
		return Admin{}
	}
	if _, err := parseAddrPort(s); err != nil {
		v.add("admin.listen", "%v", err)
	}
	return Admin{Listen: s}
}

func (v *validator) service(name string, f *fileService) (Service, bool) {
	at := "services." + name
	before := len(v.problems)
	if !serviceName.MatchString(name) {
		v.add(at, "service name must be 1-64 letters, digits, '_' or '-'")
	}
	svc := Service{Name: name}
	if f.Listen == nil {
		v.add(at+".listen", "missing: every service needs a listen address such as \"0.0.0.0:5432\"")
	} else if s, ok := v.str(at+".listen", f.Listen); ok {
		ap, err := parseAddrPort(s)
		if err != nil {
			v.add(at+".listen", "%v", err)
		}
		svc.Listen = ap
	}
	svc.Protocol = Protocol(v.enum(at+".protocol", f.Protocol, string(DefaultProtocol), "tcp", "udp"))
	idleDefault := DefaultIdleTimeout
	if svc.Protocol == UDP {
		idleDefault = DefaultUDPIdleTimeout
		svc.MaxFlows = int(v.integer(at+".max_flows", f.MaxFlows, DefaultMaxFlows, 1, MaxMaxFlows))
		svc.RepliesPerDatagram = int(v.integer(at+".replies_per_datagram", f.RepliesPerDatagram, 0, 1, MaxRepliesPerDatagram))
	} else {
		v.only(UDP, at+".max_flows", f.MaxFlows, svc.Protocol, "")
		v.only(UDP, at+".replies_per_datagram", f.RepliesPerDatagram, svc.Protocol, "")
	}
	svc.Balance = Balance(v.enum(at+".balance", f.Balance, string(DefaultBalance), "maglev", "round_robin", "least_conn"))
	svc.HashKey = HashKey(v.enum(at+".hash_key", f.HashKey, string(DefaultHashKey), "source_ip", "source_ip_port"))
	if f.HashKey != nil && svc.Balance != Maglev {
		v.add(at+".hash_key", "applies only to balance = \"maglev\" (balance is %q)", svc.Balance)
	}
	svc.Workers = int(v.integer(at+".workers", f.Workers, DefaultWorkers, 0, MaxWorkers))
	if svc.Workers == 0 {
		svc.Workers = runtime.GOMAXPROCS(0)
	}
	svc.ConnectTimeout = v.duration(at+".connect_timeout", f.ConnectTimeout, DefaultConnectTimeout, false)
	svc.IdleTimeout = v.duration(at+".idle_timeout", f.IdleTimeout, idleDefault, false)
	svc.DrainTimeout = v.duration(at+".drain_timeout", f.DrainTimeout, DefaultDrainTimeout, true)
	if h := new(fileHealth); v.table(f.Health, h, "services", name, "health") {
		f.health = h
	}
	v.serviceHealth(at, f, &svc)
	v.serviceProtect(at, &f.fileServiceProtect, &svc)

	backends := v.backendTables(at, f.Backends)
	seen := make(map[netip.AddrPort]int, len(backends))
	for i, fb := range backends {
		if fb == nil {
			continue // not a table: reported
		}
		bat := fmt.Sprintf("%s.backends[%d]", at, i)
		for key := range fb {
			if !contains(backendKeys, key) {
				v.add(bat+"."+key, "unknown key")
			}
		}
		b := Backend{Weight: DefaultWeight}
		if raw, ok := fb["address"]; !ok {
			v.add(bat+".address", "missing: every backend needs an address such as \"10.0.0.11:5432\"")
		} else if s, ok := v.str(bat+".address", raw); ok {
			ap, err := parseAddrPort(s)
			if err != nil {
				v.add(bat+".address", "%v", err)
			} else if why := notAHost(ap.Addr()); why != "" {
				v.add(bat+".address", "%s %s", ap, why)
			} else if first, dup := seen[ap]; dup {
				v.add(bat+".address", "duplicate backend %s (also %s.backends[%d])", ap, at, first)
			} else if ap == svc.Listen || (svc.Protocol == TCP && ap.Port() == svc.Listen.Port() &&
				svc.Listen.Addr().IsUnspecified() && listenOverlap(svc.Listen.Addr(), ap.Addr()) && ap.Addr().IsLoopback()) {
				// A wildcard UDP service may front a resolver on loopback
				// at its own port; the exact address never.
				v.add(bat+".address", "%s is the service's own listen address (%s): l4lb would connect to itself", ap, svc.Listen)
			} else {
				seen[ap] = i
			}
			b.Address = ap
		}
		b.Weight = int(v.integer(bat+".weight", fb["weight"], DefaultWeight, 0, MaxWeight))
		if raw, ok := fb["max_connections"]; ok && svc.Protocol != TCP {
			v.add(bat+".max_connections", "applies only to protocol = \"tcp\" (protocol is %q)", svc.Protocol)
		} else {
			b.MaxConnections = int(v.integer(bat+".max_connections", raw, DefaultMaxConnections, 0, MaxConnectionLimit))
		}
		b.Backup = v.boolean(bat+".backup", fb["backup"], DefaultBackup)
		svc.Backends = append(svc.Backends, b)
	}
	if len(svc.Backends) > 0 && len(svc.Backends) == len(backends) && !slices.ContainsFunc(svc.Backends, func(b Backend) bool { return !b.Backup }) {
		// Backups stand in for primaries: with none, they would be plain
		// backends under another name. (An element that is not a table,
		// reported already, might be the primary.)
		v.add(at+".backends", "every backend has backup = true: a backup takes connections only when no primary can, so at least one backend must be a primary (backup = false, the default)")
	}
	return svc, len(v.problems) == before
}

// backendTables returns the tables of a service's backends, with nil in
// place of an element that is not a table (reported here, as is a missing
// or empty array, or one that is not an array).
func (v *validator) backendTables(at string, raw any) []map[string]any {
	var out []map[string]any
	switch raw := raw.(type) {
	case nil:
	case []map[string]any: // [[services.NAME.backends]] tables
		out = raw
	case []any: // an inline array: tables, or the addresses of HAProxy's and nginx's habit
		out = make([]map[string]any, len(raw))
		for i, e := range raw {
			if m, ok := e.(map[string]any); ok {
				out[i] = m
				continue
			}
			bat := fmt.Sprintf("%s.backends[%d]", at, i)
			if s, ok := e.(string); ok {
				v.add(bat, "want a table, got the string %q: backends are tables, each with an address: write [[%s.backends]] and address = %q on the line below it, or { address = %q }", s, at, s, s)
			} else {
				v.add(bat, "want a table such as { address = \"10.0.0.11:5432\" }, got %s", tomlType(e))
			}
		}
	default:
		v.add(at+".backends", "want an array of tables ([[%s.backends]], each with an address), got %s", at, tomlType(raw))
		return nil
	}
	if len(out) == 0 {
		v.add(at+".backends", "no backends: add at least one [[%s.backends]] table", at)
	}
	return out
}

// checkListenConflicts rejects two services that would receive the same
// packets: the same port and protocol with addresses that overlap
// (SO_REUSEPORT would let both bind and silently split the traffic).
func (v *validator) checkListenConflicts(services []Service) {
	for i := range services {
		for j := 0; j < i; j++ {
			a, b := services[j], services[i]
			if a.Protocol != b.Protocol || a.Listen.Port() != b.Listen.Port() {
				continue
			}
			if listenOverlap(a.Listen.Addr(), b.Listen.Addr()) {
				v.add("services."+b.Name+".listen", "%s overlaps services.%s.listen (%s)", b.Listen, a.Name, a.Listen)
			}
		}
	}
}

// listenOverlap reports whether services listening on a and b, on one
// port, would share clients. 0.0.0.0 is every IPv4 address and no IPv6
// one (l4lb binds it as an IPv4 socket), so it leaves [::1] and
// [fd00::1] alone; [::] is every address of both families (l4lb binds
// it dual-stack). 0.0.0.0 and [::] overlap: the kernel binds both, and
// gives the IPv4 clients to the 0.0.0.0 service, silently taking them
// from the [::] one.
func listenOverlap(a, b netip.Addr) bool {
	switch {
	case a == b, a == netip.IPv6Unspecified(), b == netip.IPv6Unspecified():
		return true
	case a == netip.IPv4Unspecified():
		return b.Is4()
	case b == netip.IPv4Unspecified():
		return a.Is4()
	}
	return false
}

// checkAdminConflict rejects an admin endpoint on a TCP service's address:
// l4lb would fail to bind one of them at start.
// byDefault: admin is the default, which the file never wrote, so the
// message says how to move or turn it off.
func (v *validator) checkAdminConflict(admin string, byDefault bool, services []Service) {
	ap, err := netip.ParseAddrPort(admin)
	if err != nil {
		return // off, or reported already
	}
	for _, svc := range services {
		sa := svc.Listen.Addr()
		if svc.Protocol == TCP && svc.Listen.Port() == ap.Port() && listenOverlap(sa, ap.Addr()) {
			if byDefault {
				v.add("admin.listen", "the default admin endpoint %s overlaps services.%s.listen (%s): set [admin] listen to another address, or to \"\" for none", admin, svc.Name, svc.Listen)
			} else {
				v.add("admin.listen", "%s overlaps services.%s.listen (%s)", admin, svc.Name, svc.Listen)
			}
		}
	}
}

func (v *validator) str(key string, raw any) (string, bool) {
	s, ok := raw.(string)
	if !ok {
		v.add(key, "want a string, got %s", tomlType(raw))
	}
	return s, ok
}

func (v *validator) enum(key string, raw any, def string, choices ...string) string {
	if raw == nil {
		return def
	}
	s, ok := v.str(key, raw)
	if !ok {
		return def
	}
	if !contains(choices, s) {
		v.add(key, "%q is not one of %s", s, strings.Join(choices, ", "))
		return def
	}
	return s
}

func (v *validator) boolean(key string, raw any, def bool) bool {
	if raw == nil {
		return def
	}
	b, ok := raw.(bool)
	if !ok {
		v.add(key, "want true or false, got %s", tomlType(raw))
		return def
	}
	return b
}

func (v *validator) integer(key string, raw any, def, lo, hi int64) int64 {
	if raw == nil {
		return def
	}
	n, ok := raw.(int64)
	if !ok {
		v.add(key, "want an integer, got %s", tomlType(raw))
		return def
	}
	if n < lo || n > hi {
		v.add(key, "%d is out of range [%d, %d]", n, lo, hi)
		return def
	}
	return n
}

func (v *validator) duration(key string, raw any, def time.Duration, zeroOK bool) time.Duration {
	if raw == nil {
		return def
	}
	s, ok := raw.(string)
	if !ok {
		v.add(key, "want a duration string such as \"3s\" or \"1h30m\", got %s", tomlType(raw))
		return def
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		v.add(key, "%q is not a duration (use units: \"500ms\", \"3s\", \"1h\")", s)
		return def
	}
	if d < 0 && zeroOK {
		v.add(key, "%s must not be negative (\"0s\" is allowed)", s)
		return def
	}
	if d < 0 || (d == 0 && !zeroOK) {
		v.add(key, "%s must be greater than zero", s)
		return def
	}
	return d
}

// parseAddrPort accepts an IP literal and port: "10.0.0.1:80", "[::1]:80".
// Host names are refused on purpose: the data path never resolves names, and
// a name resolved once at load time would silently go stale.
func parseAddrPort(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		if strings.Count(s, ":") > 1 && !strings.HasPrefix(s, "[") {
			return netip.AddrPort{}, fmt.Errorf("%q: put IPv6 addresses in brackets, e.g. \"[::1]:5432\"", s)
		}
		host, port, found := strings.Cut(s, ":")
		switch {
		case !found:
			return netip.AddrPort{}, fmt.Errorf("%q: want IP:port, e.g. \"10.0.0.1:5432\" or \"[::1]:5432\"", s)
		case host == "":
			return netip.AddrPort{}, fmt.Errorf("%q: missing IP: use \"0.0.0.0:%s\" or \"[::]:%s\" to listen on every address", s, port, port)
		}
		if _, perr := netip.ParseAddr(host); perr != nil && !strings.HasPrefix(host, "[") && !strings.Contains(port, ":") {
			switch {
			case strings.TrimSpace(host) != host:
				return netip.AddrPort{}, fmt.Errorf("%q: remove the spaces around the address", s)
			case strings.Trim(host, "0123456789.") == "":
				// Digits and dots: a mistyped IPv4 address, not a name.
				_, why, _ := strings.Cut(perr.Error(), "): ")
				return netip.AddrPort{}, fmt.Errorf("%q: %q is not a valid IPv4 address: %s", s, host, why)
			}
			return netip.AddrPort{}, fmt.Errorf("%q: %q is not an IP address (host names are not resolved)", s, host)
		}
		if i := strings.LastIndexByte(s, ':'); i >= 0 {
			if _, perr := parsePort(s[i+1:]); perr != nil {
				return netip.AddrPort{}, fmt.Errorf("%q: %v", s, perr)
			}
		}
		return netip.AddrPort{}, fmt.Errorf("%q: want IP:port, e.g. \"10.0.0.1:5432\" or \"[::1]:5432\"", s)
	}
	if ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("%q: port 0 is not allowed, use 1-65535", s)
	}
	if ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("%q: IPv6 zones are not supported", s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// notAHost says why a backend cannot be at addr, or "" when it can: the
// unspecified address (a connect to it reaches this host, which is never
// what a backend list means), multicast and broadcast addresses (no TCP
// connection, and no UDP flow's replies, come from one).
func notAHost(addr netip.Addr) string {
	switch {
	case addr.IsUnspecified():
		return "is the unspecified address, not a backend's (a connect to it reaches this host): give the backend's own address"
	case addr.IsMulticast():
		return "is a multicast address: a backend needs a unicast one"
	case addr == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "is the broadcast address: a backend needs a unicast one"
	}
	return ""
}

func parsePort(s string) (int, error) {
	n := 0
	if s == "" {
		return 0, errors.New("missing port")
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("port %q is not a number", s)
		}
		n = n*10 + int(c-'0')
		if n > 65535 {
			return 0, fmt.Errorf("port %s is out of range, use 1-65535", s)
		}
	}
	if n == 0 {
		return 0, errors.New("port 0 is not allowed, use 1-65535")
	}
	return n, nil
}

func tomlType(raw any) string {
	switch raw.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case []any, []map[string]any:
		return "an array"
	case map[string]any:
		return "a table"
	case time.Time:
		return "a date-time"
	default:
		return fmt.Sprintf("%T", raw)
	}
}

// tomlTypeName names a type as MetaData.Type spells it.
func tomlTypeName(t string) string {
	switch t {
	case "String":
		return "a string"
	case "Integer":
		return "an integer"
	case "Float":
		return "a float"
	case "Bool":
		return "a boolean"
	case "Datetime":
		return "a date-time"
	case "Array":
		return "an array"
	case "ArrayHash":
		return "an array of tables"
	case "Hash":
		return "a table"
	default:
		return strings.ToLower(t)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
