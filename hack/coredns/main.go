// CoreDNS for the local stack, built from the pinned github.com/coredns/coredns module with only the
// plugins that our Corefiles use: the real node's (hack/node.sh: bind, errors, ready, kubernetes,
// cache) and kubeadm's default on the kind node image (health, prometheus, forward, loop, reload,
// loadbalance, log besides). This is CoreDNS's documented way to choose plugins (its plugin.cfg picks
// what core/plugin imports); the stock main imports every plugin, the cloud DNS providers' SDKs
// (AWS, Azure, Google), tracing and GeoIP among them: 353 CPU-seconds to build from an empty cache here,
// against 245 for this one.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

func main() {
	coremain.Run()
}
