// Row (g) of bench/run.py: the agent's job done by Go's standard library, the data plane
// of Go-based intercept agents. Each request is routed on its own x-dev header, as nginx's
// map does in row (b): "alice" to the local app, anything else to the upstream, over
// kept-alive upstream connections. bench/run.py builds it (go build) and runs it with
// GOMAXPROCS=1 on the pod's CPU.
//
//	goproxy LISTEN UPSTREAM LOCAL    (host:port each)
package main

import (
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
)

func main() {
	listen, upstream, local := os.Args[1], &url.URL{Scheme: "http", Host: os.Args[2]}, &url.URL{Scheme: "http", Host: os.Args[3]}
	proxy := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			if r.In.Header.Get("X-Dev") == "alice" {
				r.SetURL(local)
			} else {
				r.SetURL(upstream)
			}
			r.Out.Host = r.In.Host // as nginx's proxy_set_header Host $http_host
		},
		Transport: &http.Transport{MaxIdleConnsPerHost: 1024, DisableCompression: true},
	}
	log.Fatal(http.ListenAndServe(listen, proxy))
}
