package config

import "regexp"

// Log configures l4lb's own log.
type Log struct {
	// Level is one of trace, debug, info, warn, error.
	Level string
	// Format is "text" or "json".
	Format string
	// Connections logs one line at info level when a proxied connection
	// closes: client, service, backend, bytes each way, duration, reason.
	Connections bool
}

// Process configures the process itself.
type Process struct {
	// User and Group, when set, are who l4lb runs as once its sockets are
	// bound; it starts as root to bind them. Group "" means User's primary
	// group.
	User, Group string
}

// Defaults of [log] and [process].
const (
	DefaultLogLevel       = "info"
	DefaultLogFormat      = "text"
	DefaultLogConnections = false
)

type fileLog struct {
	Level       any `toml:"level"`
	Format      any `toml:"format"`
	Connections any `toml:"connections"`
}

type fileProcess struct {
	User  any `toml:"user"`
	Group any `toml:"group"`
}

// accountName is what useradd accepts, and numeric ids.
var accountName = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}\$?$|^[0-9]+$`)

func (v *validator) log(f *fileLog) Log {
	if f == nil {
		f = &fileLog{}
	}
	return Log{
		Level:       v.enum("log.level", f.Level, DefaultLogLevel, "trace", "debug", "info", "warn", "error"),
		Format:      v.enum("log.format", f.Format, DefaultLogFormat, "text", "json"),
		Connections: v.boolean("log.connections", f.Connections, DefaultLogConnections),
	}
}

func (v *validator) process(f *fileProcess) Process {
	var p Process
	if f == nil {
		return p
	}
	for _, field := range []struct {
		key string
		raw any
		dst *string
	}{{"process.user", f.User, &p.User}, {"process.group", f.Group, &p.Group}} {
		if field.raw == nil {
			continue
		}
		s, ok := v.str(field.key, field.raw)
		if ok && s != "" && !accountName.MatchString(s) {
			v.add(field.key, "%q is not a user or group name", s)
			continue
		}
		*field.dst = s
	}
	if p.Group != "" && p.User == "" {
		v.add("process.group", "needs process.user: l4lb only changes group when it drops root for a user")
	}
	return p
}
