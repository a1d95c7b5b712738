package config

import (
	"strings"
	"testing"
)

const minimalService = "[services.a]\nlisten = \"127.0.0.1:1000\"\n[[services.a.backends]]\naddress = \"127.0.0.1:2000\"\n"

func TestLogAndProcessDefaults(t *testing.T) {
	cfg, err := Parse([]byte(minimalService), "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Log != (Log{Level: "info", Format: "text"}) || cfg.Process != (Process{}) {
		t.Errorf("defaults: log %+v process %+v", cfg.Log, cfg.Process)
	}
	// The admin endpoint must never listen beyond loopback unless asked.
	if !strings.HasPrefix(cfg.Admin.Listen, "127.0.0.1:") {
		t.Errorf("default admin.listen %q is not loopback", cfg.Admin.Listen)
	}
}

func TestLogAndProcessValues(t *testing.T) {
	cfg, err := Parse([]byte("[log]\nlevel = \"debug\"\nformat = \"json\"\nconnections = true\n[process]\nuser = \"l4lb\"\ngroup = \"l4lb\"\n"+minimalService), "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Log != (Log{Level: "debug", Format: "json", Connections: true}) || cfg.Process != (Process{User: "l4lb", Group: "l4lb"}) {
		t.Errorf("got log %+v process %+v", cfg.Log, cfg.Process)
	}
}

func TestLogAndProcessErrors(t *testing.T) {
	file := "[log]\nlevel = \"loud\"\nformat = \"xml\"\nconnections = \"yes\"\ncolour = 1\n[process]\ngroup = \"Bad Name\"\n" + minimalService
	_, err := Parse([]byte(file), "ops.toml")
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{
		"log.level: \"loud\" is not one of", "log.format: \"xml\" is not one of", "log.connections: want true or false",
		"log.colour: unknown key", "process.group: \"Bad Name\" is not a user or group name",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in:\n%v", want, err)
		}
	}
}
