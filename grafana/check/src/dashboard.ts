/**
 * The type every dashboard in grafana/dashboards must satisfy: @grafana/schema's `Dashboard`,
 * with the parts that schema leaves open to each data source filled in for Prometheus, and
 * with string enums accepted as the plain strings a JSON file holds.
 *
 * Why narrow the open parts: the schema types panel targets as `Record<string, unknown>` and
 * annotation targets as the bare `DataQuery`, so a misspelt `expr` would pass unnoticed (or a
 * valid Prometheus annotation would fail). The fields below are those the Prometheus data
 * source reads.
 */
import type {
  AnnotationQuery,
  Dashboard,
  DataQuery,
  Panel,
  RowPanel,
} from '@grafana/schema';

/** JSON has no enums: each string enum becomes the union of its values. */
export type Json<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? Json<U>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;

/** A panel target of the Prometheus data source. */
export interface PrometheusQuery extends DataQuery {
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  interval?: string;
  format?: 'time_series' | 'table' | 'heatmap';
  exemplar?: boolean;
  editorMode?: 'code' | 'builder';
  intervalFactor?: number;
}

/** A Prometheus annotation, in the flat form the data source accepts (and exports). */
export interface PrometheusAnnotation extends AnnotationQuery<PrometheusQuery> {
  expr?: string;
  step?: string;
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}

export type PrometheusPanel = Omit<Panel, 'targets'> & { targets?: PrometheusQuery[] };

export type PrometheusRowPanel = Omit<RowPanel, 'panels'> & { panels: PrometheusPanel[] };

export type CheckedDashboard = Json<
  Omit<Dashboard, 'annotations' | 'panels'> & {
    annotations?: { list?: PrometheusAnnotation[] };
    panels?: Array<PrometheusPanel | PrometheusRowPanel>;
  }
>;
