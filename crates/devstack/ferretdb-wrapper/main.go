// Command ferretdb runs FerretDB embedded, as a standalone Mongo-wire server for the devstack.
//
// FerretDB's own cmd/ferretdb, built with `go install`, panics at start: it expects a generated
// build/version/version.txt that the published module does not contain. The embeddable package
// (github.com/FerretDB/FerretDB/ferretdb) skips that check and also disables telemetry and keeps no state file,
// so this wrapper is all it takes. It serves until SIGTERM or SIGINT.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on")
	handler := flag.String("handler", "sqlite", "backend: sqlite or postgresql")
	sqliteDir := flag.String("sqlite-dir", "", "directory of the SQLite databases (sqlite handler)")
	sqliteSync := flag.String("sqlite-synchronous", "full",
		"SQLite's synchronous pragma: full (fsync every commit), normal (WAL survives a crash of this process, "+
			"not of the machine) or off")
	pgURL := flag.String("postgresql-url", "", "PostgreSQL URL (postgresql handler)")
	logLevel := flag.String("log-level", "warn", "debug, info, warn or error")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "ferretdb: bad --log-level %q: %s\n", *logLevel, err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	cfg := &ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: *listen},
		Logger:   logger,
		Handler:  *handler,
	}
	switch *handler {
	case "sqlite":
		if *sqliteDir == "" {
			fmt.Fprintln(os.Stderr, "ferretdb: --sqlite-dir is required with --handler sqlite")
			os.Exit(2)
		}
		if err := os.MkdirAll(*sqliteDir, 0o755); err != nil {
			fmt.Fprintf(os.Stderr, "ferretdb: %s\n", err)
			os.Exit(1)
		}
		switch *sqliteSync {
		case "full", "normal", "off":
		default:
			fmt.Fprintf(os.Stderr, "ferretdb: bad --sqlite-synchronous %q (full, normal or off)\n", *sqliteSync)
			os.Exit(2)
		}
		// A URI naming a directory: FerretDB keeps one SQLite file per Mongo database in it (and adds WAL mode
		// and a busy timeout itself).
		// No `mode=memory`: FerretDB then allows one connection per database, and an `update` command holds a
		// connection per matching statement until it ends, so the second such statement would wait forever.
		q := url.Values{"_pragma": {"synchronous(" + *sqliteSync + ")"}}
		cfg.SQLiteURL = "file:" + *sqliteDir + "/?" + q.Encode()
	case "postgresql":
		if *pgURL == "" {
			fmt.Fprintln(os.Stderr, "ferretdb: --postgresql-url is required with --handler postgresql")
			os.Exit(2)
		}
		cfg.PostgreSQLURL = *pgURL
	default:
		fmt.Fprintf(os.Stderr, "ferretdb: unknown --handler %q (sqlite or postgresql)\n", *handler)
		os.Exit(2)
	}

	f, err := ferretdb.New(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferretdb: %s\n", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	logger.Info("serving", slog.String("listen", *listen), slog.String("handler", *handler))
	if err := f.Run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "ferretdb: %s\n", err)
		os.Exit(1)
	}
}
