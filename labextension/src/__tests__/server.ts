/**
 * A stand-in for the tfos server extension: answers `ServerConnection` requests from
 * fixture JSON, records them, and can be down. The client under test is the real one,
 * so URLs, the token header and error handling are what runs in JupyterLab.
 */

import { ServerConnection } from '@jupyterlab/services';

import { TfosClient } from '../api';

export const BASE_URL = 'http://127.0.0.1:8888/user/me/';
export const TOKEN = 'fixture-token';

type Handler = (url: URL, request: Request) => Response | Promise<Response>;

export interface IRecorded {
  method: string;
  /** Path and query, without JupyterLab's cache-busting timestamp. */
  path: string;
  authorization: string | null;
}

export function json(body: unknown, status = 200): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { 'Content-Type': 'application/json' }
  });
}

export class FakeServer {
  readonly requests: IRecorded[] = [];
  /** When true, every request fails as a refused connection does. */
  down = false;

  on(method: string, path: string, handler: Handler | unknown): this {
    this._routes.set(
      `${method} ${new URL(path, BASE_URL).pathname}`,
      typeof handler === 'function' ? (handler as Handler) : () => json(handler)
    );
    return this;
  }

  client(): TfosClient {
    return new TfosClient(
      ServerConnection.makeSettings({
        baseUrl: BASE_URL,
        token: TOKEN,
        fetch: (input: RequestInfo | URL, init?: RequestInit) => this._fetch(input, init)
      })
    );
  }

  paths(method = 'GET'): string[] {
    return this.requests.filter(r => r.method === method).map(r => r.path);
  }

  private async _fetch(input: RequestInfo | URL, init?: RequestInit): Promise<Response> {
    const request = input instanceof Request ? input : new Request(input, init);
    if (this.down) {
      throw new TypeError('Failed to fetch');
    }
    const url = new URL(request.url);
    // JupyterLab appends `&<timestamp>` (a cache buster) to every request.
    const query: string[] = [];
    url.searchParams.forEach((value, key) => {
      if (!/^\d+$/.test(key)) {
        query.push(`${key}=${value}`);
      }
    });
    this.requests.push({
      method: request.method,
      path: url.pathname + (query.length ? `?${query.join('&')}` : ''),
      authorization: request.headers.get('Authorization')
    });
    const handler = this._routes.get(`${request.method} ${url.pathname}`);
    if (!handler) {
      // What jupyter_server answers for a route no extension registered.
      return new Response('<html><body>404 : Not Found</body></html>', {
        status: 404,
        headers: { 'Content-Type': 'text/html' }
      });
    }
    return handler(url, request);
  }

  private readonly _routes = new Map<string, Handler>();
}
